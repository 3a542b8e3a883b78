"""A small but real Flask app: JSON, forms, uploads, sessions, redirects, streaming."""

from flask import Flask, Response, jsonify, redirect, request, session, stream_with_context

app = Flask(__name__)
app.secret_key = "not-a-secret-for-tests"


@app.get("/")
def index():
    return "Hello from Flask"


@app.post("/json")
def echo_json():
    data = request.get_json()
    return jsonify(received=data, script_root=request.script_root, path=request.path)


@app.post("/form")
def form():
    return f"name={request.form['name']} tags={','.join(request.form.getlist('tag'))}"


@app.post("/upload")
def upload():
    f = request.files["file"]
    content = f.read()
    return jsonify(filename=f.filename, size=len(content), head=content[:8].decode("latin-1"))


@app.get("/login")
def login():
    session["user"] = request.args["user"]
    return redirect("/whoami")


@app.get("/whoami")
def whoami():
    return jsonify(user=session.get("user"))


@app.get("/stream")
def stream():
    def generate():
        for i in range(5):
            yield f"part {i}\n"
    return Response(stream_with_context(generate()), mimetype="text/plain")


@app.get("/boom")
def boom():
    raise RuntimeError("flask view failed")
