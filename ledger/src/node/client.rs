//! A blocking client for a replica process: submit entries, receive commit replies. Used by
//! the real-process tests and the benchmark.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use super::{client_frame, FRAME_BUSY, FRAME_COMMITTED, FRAME_SUBMIT, MAX_FRAME_BYTES};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `certificate`: the signed messages the replica executed the block on (2f+1 commits for
    /// its digest, or a 2f+1 checkpoint proof after a state transfer). Check them with
    /// `Membership::verify_all`.
    Committed {
        entry_hash: [u8; 32],
        seq: u64,
        root: [u8; 32],
        certificate: Vec<crate::core::Signed>,
    },
    Busy {
        entry_hash: [u8; 32],
    },
}

pub struct Client {
    stream: TcpStream,
}

pub fn entry_hash(entry: &[u8]) -> [u8; 32] {
    Sha256::digest(entry).into()
}

impl Client {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<Client> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        Ok(Client { stream })
    }

    pub fn submit(&mut self, entry: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(&client_frame(FRAME_SUBMIT, entry))
    }

    /// The next reply; an error on timeout or a closed connection.
    pub fn recv(&mut self) -> std::io::Result<Reply> {
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 || len > MAX_FRAME_BYTES {
            return Err(bad("frame size out of range"));
        }
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body)?;
        let hash: [u8; 32] = body
            .get(1..33)
            .ok_or_else(|| bad("short reply"))?
            .try_into()
            .expect("32");
        match body[0] {
            FRAME_COMMITTED => {
                let seq = u64::from_be_bytes(
                    body.get(33..41)
                        .ok_or_else(|| bad("short reply"))?
                        .try_into()
                        .expect("8"),
                );
                let root: [u8; 32] = body
                    .get(41..73)
                    .ok_or_else(|| bad("short reply"))?
                    .try_into()
                    .expect("32");
                let certificate = crate::core::message::decode_signed_list(&body[73..])
                    .map_err(|e| bad(&e.to_string()))?;
                Ok(Reply::Committed {
                    entry_hash: hash,
                    seq,
                    root,
                    certificate,
                })
            }
            FRAME_BUSY => Ok(Reply::Busy { entry_hash: hash }),
            k => Err(bad(&format!("unexpected frame kind {k}"))),
        }
    }
}
