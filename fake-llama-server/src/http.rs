//! A small HTTP/1.1 server: one thread per connection, keep-alive, `Content-Length` bodies. Enough
//! for llama-server's API, and fully under our control (tiny_http's task pool could leave a burst of
//! new keep-alive connections unserved, which made concurrency tests lose requests).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

/// Largest request body accepted (a 20 MiB frame as base64 is about 27 MiB).
const MAX_BODY: usize = 64 * 1024 * 1024;

/// One request.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The connection the request came on, to see whether the client is still there.
    pub client: Option<TcpStream>,
}

impl Request {
    /// Whether the client closed the connection (it gave up waiting): as the real server does, a
    /// request whose client is gone is not worked on further.
    pub fn client_gone(&self) -> bool {
        let Some(client) = &self.client else {
            return false;
        };
        if client.set_nonblocking(true).is_err() {
            return false;
        }
        let mut byte = [0u8; 1];
        let gone = matches!(client.peek(&mut byte), Ok(0));
        let _ = client.set_nonblocking(false);
        gone
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One response: a status and a JSON body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

pub type Handler = Arc<dyn Fn(Request) -> Response + Send + Sync>;

/// Accepts connections for ever, each served on its own thread.
pub fn serve(listener: TcpListener, handler: Handler) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let handler = Arc::clone(&handler);
        std::thread::spawn(move || {
            let _ = connection(stream, &handler);
        });
    }
}

fn connection(stream: TcpStream, handler: &Handler) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
            return respond(&mut writer, &bad("malformed request line"), true);
        };
        let mut headers = Vec::new();
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((k, v)) = header.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let mut request = Request {
            method: method.to_ascii_uppercase(),
            path: target.split('?').next().unwrap_or("").to_string(),
            headers,
            body: Vec::new(),
            client: writer.try_clone().ok(),
        };
        let length = request
            .header("Content-Length")
            .map(|v| v.parse::<usize>().unwrap_or(usize::MAX))
            .unwrap_or(0);
        if length > MAX_BODY {
            return respond(&mut writer, &bad("request body too large"), true);
        }
        request.body.resize(length, 0);
        reader.read_exact(&mut request.body)?;
        let close = request
            .header("Connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let response = handler(request);
        respond(&mut writer, &response, close)?;
        if close {
            return Ok(());
        }
    }
}

fn bad(message: &str) -> Response {
    Response {
        status: 400,
        body: crate::answer::error_body(400, message, "invalid_request_error"),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

fn respond(writer: &mut TcpStream, response: &Response, close: bool) -> io::Result<()> {
    let connection = if close { "close" } else { "keep-alive" };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n",
        response.status,
        reason(response.status),
        response.body.len()
    );
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(response.body.as_bytes());
    writer.write_all(&bytes)?;
    writer.flush()
}
