//! DNS over TCP framing (RFC 1035 4.2.2, RFC 7766): every message is preceded by its length as
//! a 16-bit big-endian number. The framer turns a byte stream into whole messages, holding at
//! most one partial message (bounded by `max_message` + 2 bytes).

use std::fmt;

/// Largest message the framer accepts by default (the most a length prefix can say).
pub const DEFAULT_MAX_TCP_MESSAGE: usize = u16::MAX as usize;

/// Why a stream can't be framed; the connection should be closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// A length prefix of zero.
    Empty,
    /// A length prefix above the framer's limit.
    TooLarge { len: usize, max: usize },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Empty => write!(f, "DNS over TCP: zero-length message"),
            FrameError::TooLarge { len, max } => {
                write!(
                    f,
                    "DNS over TCP: message of {len} bytes exceeds limit {max}"
                )
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// Splits a DNS-over-TCP byte stream into messages.
#[derive(Debug)]
pub struct TcpDnsFramer {
    buf: Vec<u8>,
    max_message: usize,
}

impl Default for TcpDnsFramer {
    fn default() -> Self {
        Self::new()
    }
}

impl TcpDnsFramer {
    pub fn new() -> Self {
        Self::with_max_message(DEFAULT_MAX_TCP_MESSAGE)
    }

    /// A framer that rejects messages longer than `max_message` bytes.
    pub fn with_max_message(max_message: usize) -> Self {
        Self {
            buf: Vec::new(),
            max_message: max_message.min(DEFAULT_MAX_TCP_MESSAGE),
        }
    }

    /// Appends `data` and returns every message completed by it, in order. After an error the
    /// framer is poisoned (it keeps returning the error): close the connection.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<Vec<u8>>, FrameError> {
        let mut out = Vec::new();
        let mut data = data;
        loop {
            // Complete the length prefix.
            if self.buf.len() < 2 {
                let take = (2 - self.buf.len()).min(data.len());
                self.buf.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.buf.len() < 2 {
                    return Ok(out);
                }
            }
            let len = usize::from(u16::from_be_bytes([self.buf[0], self.buf[1]]));
            if len == 0 {
                return Err(FrameError::Empty);
            }
            if len > self.max_message {
                return Err(FrameError::TooLarge {
                    len,
                    max: self.max_message,
                });
            }
            let have = self.buf.len() - 2;
            let take = (len - have).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() - 2 < len {
                return Ok(out);
            }
            out.push(self.buf[2..].to_vec());
            self.buf.clear();
            if data.is_empty() {
                return Ok(out);
            }
        }
    }

    /// Bytes held for a message not yet complete (length prefix included).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Prefixes `msg` with its length; `None` when it can't be framed (empty or > 65535 bytes).
    pub fn frame(msg: &[u8]) -> Option<Vec<u8>> {
        let len = u16::try_from(msg.len()).ok().filter(|l| *l > 0)?;
        let mut out = Vec::with_capacity(msg.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(msg);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_and_pipelined_messages() {
        let mut f = TcpDnsFramer::new();
        let mut stream = TcpDnsFramer::frame(b"hello").unwrap();
        stream.extend(TcpDnsFramer::frame(b"world!").unwrap());
        let msgs = f.push(&stream).unwrap();
        assert_eq!(msgs, vec![b"hello".to_vec(), b"world!".to_vec()]);
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn byte_by_byte() {
        let mut f = TcpDnsFramer::new();
        let stream = TcpDnsFramer::frame(&[7u8; 300]).unwrap();
        let mut got = Vec::new();
        for b in &stream {
            got.extend(f.push(std::slice::from_ref(b)).unwrap());
        }
        assert_eq!(got, vec![vec![7u8; 300]]);
        assert_eq!(f.buffered(), 0);
    }

    #[test]
    fn split_across_pushes_keeps_partial() {
        let mut f = TcpDnsFramer::new();
        let stream = TcpDnsFramer::frame(b"abcdef").unwrap();
        assert!(f.push(&stream[..4]).unwrap().is_empty());
        assert_eq!(f.buffered(), 4);
        assert_eq!(f.push(&stream[4..]).unwrap(), vec![b"abcdef".to_vec()]);
    }

    #[test]
    fn limits() {
        let mut f = TcpDnsFramer::with_max_message(10);
        assert_eq!(
            f.push(&[0, 11, 1, 2]),
            Err(FrameError::TooLarge { len: 11, max: 10 })
        );
        let mut f = TcpDnsFramer::new();
        assert_eq!(f.push(&[0, 0]), Err(FrameError::Empty));
        assert!(TcpDnsFramer::frame(&[]).is_none());
        assert!(TcpDnsFramer::frame(&vec![0u8; 65536]).is_none());
        assert_eq!(TcpDnsFramer::frame(&vec![0u8; 65535]).unwrap().len(), 65537);
    }
}
