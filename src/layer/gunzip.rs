//! Gzip members (RFC 1952), one after another, inflated with zlib-rs — without the CRC-32.
//!
//! A layer's uncompressed bytes are hashed with SHA-256 and must be its diff ID, or the layer
//! is refused; a stream that passes that check is the one its author published, whatever its
//! CRC-32 says, and one that fails it is refused whatever its CRC-32 says. Computing the CRC
//! was 3% of a build's CPU time on the decompressing thread, the one that paces the stream,
//! for nothing the SHA-256 does not already decide. Everything else is checked as
//! `flate2::bufread::MultiGzDecoder` checks it (whose header rules these are): the header's
//! magic, method and reserved flags, its optional fields and their CRC-16, the deflate data,
//! an 8-byte trailer after every member with the member's length (ISIZE), and nothing but
//! further members after the first.

use std::io::{self, BufRead, Read};

use flate2::bufread::DeflateDecoder;

const FHCRC: u8 = 1 << 1;
const FEXTRA: u8 = 1 << 2;
const FNAME: u8 = 1 << 3;
const FCOMMENT: u8 = 1 << 4;
/// A name or comment longer than this is refused (as flate2 does).
const MAX_FIELD: usize = u16::MAX as usize;

/// Reads gzip members from `R` and serves their inflated bytes.
pub struct Gunzip<R: BufRead> {
    /// The decompressor, over the input: headers and trailers are read past it
    /// (`get_mut`), and it is reset for each member.
    deflate: DeflateDecoder<R>,
    at: At,
    /// Bytes served from the current member (its ISIZE, modulo 2³²).
    member_len: u64,
}

/// Where in the stream a [`Gunzip`] is.
#[derive(Clone, Copy)]
enum At {
    /// Before a member's header; `first`: the stream's first member, which must be there.
    Header {
        first: bool,
    },
    Body,
    /// The stream ended, or failed (its error was returned).
    Done,
}

impl<R: BufRead> Gunzip<R> {
    /// Reads the members of `input`, from its first byte on.
    pub fn new(input: R) -> Self {
        Gunzip { deflate: DeflateDecoder::new(input), at: At::Header { first: true }, member_len: 0 }
    }

    /// The input, after whatever was read of it.
    pub fn into_inner(self) -> R {
        self.deflate.into_inner()
    }

    /// One step through the stream: `Some(n)` once `n` bytes are served (0 at the end),
    /// `None` to go on.
    fn step(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.at {
            At::Done => Ok(Some(0)),
            At::Header { first } => {
                let input = self.deflate.get_mut();
                // After a member: the end of the input, or another member's header.
                if !first && input.fill_buf()?.is_empty() {
                    self.at = At::Done;
                    return Ok(Some(0));
                }
                read_header(input)?;
                self.deflate.reset_data();
                self.member_len = 0;
                self.at = At::Body;
                Ok(None)
            }
            // 0: the deflate data ended (or the input did: then the trailer is missing).
            At::Body => match self.deflate.read(buf)? {
                0 => {
                    read_trailer(self.deflate.get_mut(), self.member_len)?;
                    self.at = At::Header { first: false };
                    Ok(None)
                }
                n => {
                    self.member_len += n as u64;
                    Ok(Some(n))
                }
            },
        }
    }
}

impl<R: BufRead> Read for Gunzip<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.step(buf) {
                Ok(Some(n)) => return Ok(n),
                Ok(None) => {}
                Err(e) => {
                    self.at = At::Done;
                    return Err(e);
                }
            }
        }
    }
}

fn bad_header() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "invalid gzip header")
}

/// Reads one member header, up to its deflate data.
fn read_header(input: &mut impl BufRead) -> io::Result<()> {
    let mut crc = flate2::Crc::new();
    let mut fixed = [0u8; 10];
    input.read_exact(&mut fixed)?;
    crc.update(&fixed);
    let [0x1f, 0x8b, 8, flags, ..] = fixed else { return Err(bad_header()) };
    // RFC 1952: "must give an error indication if any reserved bit is non-zero".
    if flags & 0xe0 != 0 {
        return Err(bad_header());
    }
    if flags & FEXTRA != 0 {
        let mut len = [0u8; 2];
        input.read_exact(&mut len)?;
        crc.update(&len);
        let mut extra = vec![0u8; u16::from_le_bytes(len) as usize];
        input.read_exact(&mut extra)?;
        crc.update(&extra);
    }
    for field in [FNAME, FCOMMENT] {
        if flags & field != 0 {
            let mut text = Vec::new();
            input.take(MAX_FIELD as u64 + 1).read_until(0, &mut text)?;
            match text.last() {
                Some(0) => crc.update(&text),
                _ if text.len() > MAX_FIELD => {
                    return Err(io::Error::new(io::ErrorKind::InvalidInput, "gzip header field too long"));
                }
                _ => return Err(io::ErrorKind::UnexpectedEof.into()),
            }
        }
    }
    if flags & FHCRC != 0 {
        let mut stored = [0u8; 2];
        input.read_exact(&mut stored)?;
        if u16::from_le_bytes(stored) != crc.sum() as u16 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "gzip header CRC-16 does not match"));
        }
    }
    Ok(())
}

/// Reads a member's trailer: its CRC-32 (not checked: see the module's doc) and its length.
fn read_trailer(input: &mut impl BufRead, member_len: u64) -> io::Result<()> {
    let mut trailer = [0u8; 8];
    input.read_exact(&mut trailer)?;
    let isize = u32::from_le_bytes(trailer[4..].try_into().expect("4 bytes"));
    if isize != member_len as u32 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("gzip member is {member_len} bytes inflated, but its trailer says {isize} (mod 2^32)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_io::FailsAfter;
    use std::io::Write;

    fn gzip(data: &[u8], builder: flate2::GzBuilder) -> Vec<u8> {
        let mut enc = builder.write(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn gunzip(bytes: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        Gunzip::new(bytes).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn inflates_every_member_with_every_optional_header_field() {
        let plain = gzip(b"first member ", flate2::GzBuilder::new());
        let fancy = flate2::GzBuilder::new()
            .filename("layer.tar")
            .comment("made for a test")
            .extra(vec![1, 2, 3])
            .operating_system(3);
        // flate2 writes no header CRC: set FHCRC and append it by hand.
        let mut with_hcrc = gzip(b"second member", fancy);
        let header_len = 10 + 2 + 3 + "layer.tar\0".len() + "made for a test\0".len();
        with_hcrc[3] |= FHCRC;
        let mut crc = flate2::Crc::new();
        crc.update(&with_hcrc[..header_len]);
        let hcrc = (crc.sum() as u16).to_le_bytes();
        with_hcrc.splice(header_len..header_len, hcrc);
        let stream = [plain, with_hcrc].concat();
        assert_eq!(gunzip(&stream).unwrap(), b"first member second member");
        let mut flate2_out = Vec::new();
        flate2::bufread::MultiGzDecoder::new(&stream[..]).read_to_end(&mut flate2_out).unwrap();
        assert_eq!(flate2_out, b"first member second member", "the reference reads it alike");
    }

    #[test]
    fn a_read_error_is_returned_and_the_reader_stays_usable() {
        let member = gzip(b"one member", flate2::GzBuilder::new());
        // Between members (the error comes where the next header would start), and inside
        // one.
        for cut in [member.len(), 12] {
            let failing =
                FailsAfter { data: &member[..cut], error: || io::Error::other("the network went away") };
            let mut gz = Gunzip::new(io::BufReader::with_capacity(4, failing));
            let err = io::copy(&mut gz, &mut io::sink()).unwrap_err();
            assert_eq!(err.to_string(), "the network went away", "cut at {cut}");
            assert_eq!(gz.read(&mut [0u8; 8]).unwrap(), 0, "a failed stream reads as ended");
            drop(gz.into_inner());
        }
    }

    #[test]
    fn refuses_what_flate2_refuses_except_a_wrong_crc32() {
        let good = gzip(&[7u8; 100_000], flate2::GzBuilder::new());
        let n = good.len();
        let refused = |bytes: Vec<u8>, why: &str| {
            assert!(gunzip(&bytes).is_err(), "{why}: accepted");
            let mut sink = Vec::new();
            let reference = flate2::bufread::MultiGzDecoder::new(&bytes[..]).read_to_end(&mut sink);
            assert!(reference.is_err(), "{why}: the reference accepts it");
        };
        refused(good[..n - 1].to_vec(), "a trailer cut short");
        refused(good[..n - 8].to_vec(), "no trailer");
        refused(good[..n / 2].to_vec(), "deflate data cut short");
        let mut wrong_len = good.clone();
        wrong_len[n - 4] ^= 1;
        refused(wrong_len, "a wrong ISIZE");
        refused([good.clone(), b"junk after the member".to_vec()].concat(), "bytes after a member");
        let mut reserved = good.clone();
        reserved[3] |= 0x80;
        refused(reserved, "a reserved flag");
        let mut method = good.clone();
        method[2] = 7;
        refused(method, "a method other than deflate");
        refused(Vec::new(), "nothing at all");
        let mut hcrc = good.clone();
        hcrc[3] |= FHCRC;
        hcrc.splice(10..10, [0u8, 0u8]);
        refused(hcrc, "a wrong header CRC-16");
        // The one difference: the data's CRC-32 is not checked (the diff ID is).
        let mut wrong_crc = good.clone();
        wrong_crc[n - 8] ^= 1;
        assert_eq!(gunzip(&wrong_crc).unwrap(), vec![7u8; 100_000]);
    }
}
