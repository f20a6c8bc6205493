//! Checkpoints on disk: atomic, durable writes and a checked container.
//!
//! A file is replaced only by [`write_atomic`]: the bytes go to a temporary
//! file in the same directory, which is flushed to disk and renamed over the
//! target, and the directory is flushed so the rename survives a power loss.
//! A crash at any point leaves either the old file or the new one.
//!
//! Container layout ([`save`] / [`load`]), little-endian, 33-byte header:
//!
//! ```text
//! magic    13 bytes  b"EDGETUNE-CKPT"
//! version  u32       FORMAT_VERSION
//! length   u64       payload bytes
//! checksum u64       FNV-1a 64 of the payload
//! payload  length bytes, postcard-encoded value
//! ```

use crate::{Error, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// The first bytes of every checkpoint file.
pub const MAGIC: &[u8; 13] = b"EDGETUNE-CKPT";
/// The container version [`save`] writes and [`load`] accepts.
pub const FORMAT_VERSION: u32 = 4;
/// Bytes before the payload: magic, version, length, checksum.
const HEADER_LEN: usize = MAGIC.len() + 4 + 8 + 8;

/// Replace `path` with `bytes` atomically and durably.
///
/// Writes `.{file}.tmp-{pid}-{n}` next to `path`, fsyncs it, renames it over
/// `path` and fsyncs the directory (on unix). On any error the temporary file
/// is removed and `path` keeps its old contents.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a file path", path.display())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // The counter keeps two writers in one process (threads) apart.
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        file_name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, e))?;
        file.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        file.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// Flush a directory's entries so a rename inside it is durable.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<()> {
    let d = std::fs::File::open(dir).map_err(|e| Error::io(dir, e))?;
    d.sync_all().map_err(|e| Error::io(dir, e))
}

/// Windows cannot open a directory as a file; NTFS renames are journaled.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<()> {
    Ok(())
}

/// FNV-1a, 64-bit: offset basis 0xcbf29ce484222325, prime 0x100000001b3.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Serialize `value` with postcard into a checked container and write it with [`write_atomic`].
pub fn save<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = encode(value).map_err(|m| {
        Error::Invalid(format!("{}: cannot encode checkpoint: {m}", path.display()))
    })?;
    write_atomic(path, &bytes)
}

/// Read a file written by [`save`], verifying magic, version, length and checksum.
///
/// A damaged or foreign file is an [`Error::Invalid`] naming the file and what
/// is wrong ("not an edgetune checkpoint", "truncated", "checksum mismatch",
/// "written by format version N"); it never panics.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode(&bytes).map_err(|m| Error::Invalid(format!("{}: {m}", path.display())))
}

/// The container bytes for `value`.
fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    let payload = postcard::to_stdvec(value).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&fnv1a64(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// The value in container `bytes`, or what is wrong with them.
fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let n = MAGIC.len();
    if bytes.len() < n || &bytes[..n] != MAGIC {
        return Err(format!(
            "not an edgetune checkpoint (the file does not start with {:?})",
            std::str::from_utf8(MAGIC).unwrap_or_default()
        ));
    }
    if bytes.len() < HEADER_LEN {
        return Err(format!(
            "truncated: {} bytes, shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        ));
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
    let version = u32_at(n);
    if version != FORMAT_VERSION {
        return Err(format!(
            "written by format version {version}; this edgetune reads version {FORMAT_VERSION}"
        ));
    }
    let length = u64_at(n + 4);
    let checksum = u64_at(n + 12);
    let payload = &bytes[HEADER_LEN..];
    if (payload.len() as u64) < length {
        return Err(format!(
            "truncated: header says {length} payload bytes, the file has {}",
            payload.len()
        ));
    }
    if payload.len() as u64 > length {
        return Err(format!(
            "{} bytes of trailing data after the {length}-byte payload",
            payload.len() as u64 - length
        ));
    }
    let actual = fnv1a64(payload);
    if actual != checksum {
        return Err(format!(
            "checksum mismatch: header says {checksum:#018x}, payload hashes to {actual:#018x} (file damaged)"
        ));
    }
    postcard::from_bytes(payload).map_err(|e| {
        format!(
            "payload does not decode as the expected type ({e}); saved by another edgetune build?"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        step: u64,
        name: String,
        weights: Vec<f32>,
        nested: Vec<Vec<f32>>,
    }

    fn sample() -> Sample {
        Sample {
            step: 1234,
            name: "run ✓".into(),
            weights: vec![1.5, -0.0, f32::MIN_POSITIVE, 3.25e7],
            nested: vec![vec![], vec![0.1, 0.2]],
        }
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect()
    }

    #[test]
    fn fnv_reference_values() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.ckpt");
        save(&p, &sample()).unwrap();
        let back: Sample = load(&p).unwrap();
        assert_eq!(back, sample());
        assert!(std::fs::read(&p).unwrap().starts_with(MAGIC));
        // Saving again replaces the file.
        let mut s2 = sample();
        s2.step = 99;
        save(&p, &s2).unwrap();
        assert_eq!(load::<Sample>(&p).unwrap().step, 99);
        assert!(leftovers(dir.path()).is_empty());
    }

    fn load_err(bytes: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.ckpt");
        std::fs::write(&p, bytes).unwrap();
        let e = load::<Sample>(&p).unwrap_err().to_string();
        assert!(e.contains("bad.ckpt"), "error does not name the file: {e}");
        e
    }

    #[test]
    fn damaged_files_give_named_errors() {
        let good = encode(&sample()).unwrap();
        for cut in [HEADER_LEN - 1, HEADER_LEN, good.len() - 1] {
            let e = load_err(&good[..cut]);
            assert!(e.contains("truncated"), "cut at {cut}: {e}");
        }
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 0x40;
        assert!(load_err(&flipped).contains("checksum mismatch"));
        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(load_err(&magic).contains("not an edgetune checkpoint"));
        assert!(load_err(b"").contains("not an edgetune checkpoint"));
        let mut version = good.clone();
        version[MAGIC.len()..MAGIC.len() + 4].copy_from_slice(&7u32.to_le_bytes());
        assert!(load_err(&version).contains("written by format version 7"));
        let mut long = good.clone();
        long.push(0);
        assert!(load_err(&long).contains("trailing"));
        // A valid container whose payload is not a Sample.
        let other = encode(&(1u8, 2u8)).unwrap();
        assert!(load_err(&other).contains("does not decode"));
        // A huge length must not allocate or panic.
        let mut huge = good.clone();
        huge[MAGIC.len() + 4..MAGIC.len() + 12].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(load_err(&huge).contains("truncated"));
    }

    #[test]
    fn failed_write_leaves_old_file_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        // The target is a non-empty directory: rename over it fails.
        let target = dir.path().join("ckpt");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("old"), b"old contents").unwrap();
        let e = write_atomic(&target, b"new").unwrap_err();
        assert!(e.to_string().contains("ckpt"), "{e}");
        assert_eq!(std::fs::read(target.join("old")).unwrap(), b"old contents");
        assert!(
            leftovers(dir.path()).is_empty(),
            "{:?}",
            leftovers(dir.path())
        );

        // An existing file used as a directory: the temp file cannot be created
        // and the file keeps its contents.
        let file = dir.path().join("state.ckpt");
        write_atomic(&file, b"old").unwrap();
        assert!(write_atomic(&file.join("x"), b"new").is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"old");
        assert!(leftovers(dir.path()).is_empty());

        // A file in a directory that does not exist: nothing is created anywhere.
        let missing = dir.path().join("nope").join("x.ckpt");
        assert!(write_atomic(&missing, b"new").is_err());
        assert!(!dir.path().join("nope").exists());
    }

    #[test]
    fn overwrite_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.bin");
        write_atomic(&p, &[7u8; 100]).unwrap();
        write_atomic(&p, b"short").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"short");
        assert!(leftovers(dir.path()).is_empty());
        assert!(write_atomic(Path::new("/"), b"x").is_err());
    }
}
