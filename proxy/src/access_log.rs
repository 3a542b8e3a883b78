//! The access log, in Apache/nginx "combined" format, written by a thread of its own so that
//! request handling never waits on the disk.

use std::io::Write;
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where access-log lines go.
#[derive(Clone)]
pub struct AccessLog {
    lines: Option<mpsc::Sender<Message>>,
}

/// What the writer thread gets.
enum Message {
    /// A line to write.
    Line(String),
    /// Answer once every line sent before this one is written and flushed.
    Flushed(mpsc::Sender<()>),
}

/// One finished request, as the log needs it.
pub struct Entry<'a> {
    /// Client IP, or `-`.
    pub client: &'a str,
    /// Method, target and protocol, as in the request line.
    pub method: &'a str,
    /// The request target (path and query).
    pub target: &'a [u8],
    /// `HTTP/1.1` etc.
    pub protocol: &'a str,
    /// Status sent, 0 when none was.
    pub status: u16,
    /// Response body bytes sent.
    pub bytes: usize,
    /// The Referer header.
    pub referer: Option<&'a [u8]>,
    /// The User-Agent header.
    pub user_agent: Option<&'a [u8]>,
}

impl AccessLog {
    /// Opens the log: `"-"` for standard output, `"off"` for none, else a file to append to.
    pub fn open(target: &str) -> std::io::Result<AccessLog> {
        let sink: Box<dyn Write + Send> = match target {
            "off" => return Ok(AccessLog { lines: None }),
            "-" => Box::new(std::io::stdout()),
            path => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let (tx, rx) = mpsc::channel::<Message>();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, sink))?;
        Ok(AccessLog { lines: Some(tx) })
    }

    /// Whether lines are being written at all.
    pub fn enabled(&self) -> bool {
        self.lines.is_some()
    }

    /// Logs one request.
    pub fn log(&self, entry: &Entry<'_>) {
        if let Some(lines) = &self.lines {
            let _ = lines.send(Message::Line(format_combined(entry, SystemTime::now())));
        }
    }

    /// Waits (at most `limit`) until every line logged so far is written out: the process
    /// may be about to exit, which would end the writer thread wherever it is.
    pub fn flush(&self, limit: Duration) {
        if let Some(lines) = &self.lines {
            let (done, flushed) = mpsc::channel();
            if lines.send(Message::Flushed(done)).is_ok() {
                let _ = flushed.recv_timeout(limit);
            }
        }
    }
}

fn write_lines(rx: mpsc::Receiver<Message>, sink: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::new(sink);
    let mut waiting = Vec::new();
    while let Ok(message) = rx.recv() {
        // Batch what is already queued, then flush so lines are visible promptly.
        let mut next = Some(message);
        while let Some(message) = next {
            match message {
                Message::Line(line) => {
                    let _ = out.write_all(line.as_bytes());
                }
                Message::Flushed(done) => waiting.push(done),
            }
            next = rx.try_recv().ok();
        }
        let _ = out.flush();
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

/// `%h %l %u %t "%r" %>s %b "%{Referer}i" "%{User-agent}i"`, with quotes, backslashes and
/// non-printable bytes escaped as nginx does (`\x22`), so a request cannot forge log lines.
pub fn format_combined(e: &Entry<'_>, now: SystemTime) -> String {
    let mut line = String::with_capacity(128);
    line.push_str(e.client);
    line.push_str(" - - [");
    line.push_str(&clf_time(now));
    line.push_str("] \"");
    escape_into(&mut line, e.method.as_bytes());
    line.push(' ');
    escape_into(&mut line, e.target);
    line.push(' ');
    line.push_str(e.protocol);
    line.push_str("\" ");
    if e.status == 0 {
        line.push('-');
    } else {
        line.push_str(&e.status.to_string());
    }
    line.push(' ');
    line.push_str(&e.bytes.to_string());
    for field in [e.referer, e.user_agent] {
        line.push_str(" \"");
        match field {
            Some(v) => escape_into(&mut line, v),
            None => line.push('-'),
        }
        line.push('"');
    }
    line.push('\n');
    line
}

fn escape_into(out: &mut String, bytes: &[u8]) {
    for &b in bytes {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            out.push_str(&format!("\\x{b:02X}"));
        } else {
            out.push(b as char);
        }
    }
}

/// Common Log Format time, in UTC: `10/Oct/2000:13:55:36 +0000`.
fn clf_time(now: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = portico_core::clock::civil_from_days(days as i64);
    format!(
        "{day:02}/{}/{year}:{:02}:{:02}:{:02} +0000",
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn combined_format_with_escapes() {
        let entry = Entry {
            client: "127.0.0.1",
            method: "GET",
            target: b"/a\"b?x=1",
            protocol: "HTTP/1.1",
            status: 200,
            bytes: 13,
            referer: None,
            user_agent: Some(b"curl/8\n"),
        };
        let at = UNIX_EPOCH + Duration::from_secs(971_186_136); // 2000-10-10T13:55:36Z
        assert_eq!(
            format_combined(&entry, at),
            "127.0.0.1 - - [10/Oct/2000:13:55:36 +0000] \"GET /a\\x22b?x=1 HTTP/1.1\" 200 13 \"-\" \"curl/8\\x0A\"\n"
        );
    }
}
