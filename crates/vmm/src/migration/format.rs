//! The migration stream: a versioned header followed by typed, checksummed sections. Pure (no KVM), so every
//! refusal path is unit-tested.
//!
//! ```text
//! header   : magic "ENLMIGR\0" (8) | format version u32 LE | enlighten version: len u16 LE + UTF-8 (≤ 64)
//! section  : kind u32 LE | payload length u64 LE | CRC-32 (IEEE) of the payload u32 LE | payload
//! sections : Config (first, exactly once) · Vcpu × n · Device × k · Engine (0 or 1) · Memory × m · End
//!            (a snapshot's state file has one MemoryFile section instead of the Memory sections)
//! live     : Config · (Memory | ZeroPages) × m · Vcpu × n · Device × k · Engine (0 or 1) · GlobalState · End
//! ```
//!
//! A live migration (iterative pre-copy) sends guest RAM first, while the guest runs: pass 1 sends every
//! non-zero page, later passes send the pages dirtied since the previous pass (a page may repeat; the last copy
//! wins), and pages that became zero go as ZeroPages records. The vCPU, device and engine state follow, taken
//! with every vCPU stopped, after the final dirty pages.
//!
//! Config, Vcpu, Device and Engine payloads are JSON (serde); each owner defines its own schema and version
//! (the engine's [`hyperv::state::EngineState`] carries its own `version`). A Memory payload is a run of
//! `gpa u64 LE | 4096 bytes`; pages that are entirely zero are never sent, so the receiver zeroes RAM first.
//!
//! Every length read from the stream is checked against a per-kind limit before anything is allocated, so a
//! corrupted or hostile stream costs at most [`MAX_META_SECTION`] bytes of memory per section.

use std::io::{Read, Write};

use thiserror::Error;

/// The stream's magic bytes.
pub const MAGIC: [u8; 8] = *b"ENLMIGR\0";
/// The stream format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 2;
/// The longest enlighten version string accepted in a header.
pub const MAX_VERSION_STRING: usize = 64;
/// Guest page size used by Memory sections.
pub const PAGE_SIZE: usize = 4096;
/// An all-zero page.
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// One page record in a Memory section: the guest physical address and the page.
pub const PAGE_RECORD: usize = 8 + PAGE_SIZE;
/// Most pages in one Memory section.
pub const MAX_PAGES_PER_SECTION: usize = 256;
/// Most page addresses in one ZeroPages section.
pub const MAX_ZERO_PAGES_PER_SECTION: usize = 8192;
/// Largest Config/Vcpu/Device/Engine payload (JSON).
pub const MAX_META_SECTION: u64 = 16 << 20;

/// The enlighten version written into headers.
pub const ENLIGHTEN_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Section kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    /// The source's configuration, checked against the destination.
    Config,
    /// One vCPU's state.
    Vcpu,
    /// One device's state.
    Device,
    /// The Hyper-V engine's state.
    Engine,
    /// Guest pages.
    Memory,
    /// A snapshot's state file: where the raw memory file is and how it maps onto guest RAM (instead of
    /// Memory sections; see `migration::snapshot`).
    MemoryFile,
    /// Guest pages that are now all zero (later passes of a live migration): `gpa u64 LE` each.
    ZeroPages,
    /// The source's run state at the stop (live migration; JSON `GlobalSection`).
    GlobalState,
    /// End of stream.
    End,
}

impl SectionKind {
    /// The on-wire code.
    pub fn code(self) -> u32 {
        match self {
            SectionKind::Config => 1,
            SectionKind::Vcpu => 2,
            SectionKind::Device => 3,
            SectionKind::Engine => 4,
            SectionKind::Memory => 5,
            SectionKind::MemoryFile => 6,
            SectionKind::ZeroPages => 7,
            SectionKind::GlobalState => 8,
            SectionKind::End => 0xFF,
        }
    }

    /// The kind for an on-wire code.
    pub fn from_code(code: u32) -> Option<SectionKind> {
        Some(match code {
            1 => SectionKind::Config,
            2 => SectionKind::Vcpu,
            3 => SectionKind::Device,
            4 => SectionKind::Engine,
            5 => SectionKind::Memory,
            6 => SectionKind::MemoryFile,
            7 => SectionKind::ZeroPages,
            8 => SectionKind::GlobalState,
            0xFF => SectionKind::End,
            _ => return None,
        })
    }

    /// The name used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            SectionKind::Config => "config",
            SectionKind::Vcpu => "vcpu",
            SectionKind::Device => "device",
            SectionKind::Engine => "engine",
            SectionKind::Memory => "memory",
            SectionKind::MemoryFile => "memory file",
            SectionKind::ZeroPages => "zero pages",
            SectionKind::GlobalState => "global state",
            SectionKind::End => "end",
        }
    }

    /// The largest payload accepted for this kind.
    pub fn max_len(self) -> u64 {
        match self {
            SectionKind::Memory => (MAX_PAGES_PER_SECTION * PAGE_RECORD) as u64,
            SectionKind::ZeroPages => (MAX_ZERO_PAGES_PER_SECTION * 8) as u64,
            SectionKind::End => 0,
            _ => MAX_META_SECTION,
        }
    }
}

/// Why a stream was refused or could not be written.
#[derive(Debug, Error)]
pub enum StreamError {
    #[error("not an enlighten migration stream (bad magic {0:02x?})")]
    BadMagic([u8; 8]),
    #[error("migration stream format version {found} is not supported (this build reads version {expected})")]
    Version { found: u32, expected: u32 },
    #[error("truncated migration stream: {0}")]
    Truncated(String),
    #[error("corrupted migration stream: {0}")]
    Corrupt(String),
    #[error("migration stream does not match this VM: {0}")]
    Mismatch(String),
    #[error("migration stream I/O error: {0}")]
    Io(String),
}

impl StreamError {
    fn io(e: std::io::Error, what: &str) -> StreamError {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            StreamError::Truncated(format!("the stream ended inside {what}"))
        } else {
            StreamError::Io(format!("{what}: {e}"))
        }
    }
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), as zlib computes it.
pub fn crc32(data: &[u8]) -> u32 {
    crc32_update(0, data)
}

/// Continues a CRC-32 over more data (`crc` is the value returned for the data so far; 0 to start). The
/// crc32fast crate uses the CPU's carry-less multiply where it has one (several GB/s), so the checksum costs
/// little next to copying the pages.
pub fn crc32_update(crc: u32, data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(crc);
    h.update(data);
    h.finalize()
}

/// The stream header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The format version.
    pub format_version: u32,
    /// The enlighten version of the writer.
    pub enlighten_version: String,
}

/// Writes a stream. Counts the bytes written (for progress and `query-migrate`).
pub struct StreamWriter<W: Write> {
    out: W,
    written: u64,
}

impl<W: Write> StreamWriter<W> {
    /// Writes the header.
    pub fn new(mut out: W) -> Result<StreamWriter<W>, StreamError> {
        let v = ENLIGHTEN_VERSION.as_bytes();
        let v = &v[..v.len().min(MAX_VERSION_STRING)];
        let mut h = Vec::with_capacity(14 + v.len());
        h.extend_from_slice(&MAGIC);
        h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        h.extend_from_slice(&(v.len() as u16).to_le_bytes());
        h.extend_from_slice(v);
        out.write_all(&h)
            .map_err(|e| StreamError::Io(format!("writing the header: {e}")))?;
        Ok(StreamWriter {
            out,
            written: h.len() as u64,
        })
    }

    /// Writes one section.
    pub fn section(&mut self, kind: SectionKind, payload: &[u8]) -> Result<(), StreamError> {
        if payload.len() as u64 > kind.max_len() {
            return Err(StreamError::Io(format!(
                "{} section of {} bytes exceeds the limit of {} bytes",
                kind.name(),
                payload.len(),
                kind.max_len()
            )));
        }
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.code().to_le_bytes());
        h[4..12].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        h[12..].copy_from_slice(&crc32(payload).to_le_bytes());
        self.out
            .write_all(&h)
            .and_then(|()| self.out.write_all(payload))
            .map_err(|e| StreamError::Io(format!("writing a {} section: {e}", kind.name())))?;
        self.written += 16 + payload.len() as u64;
        Ok(())
    }

    /// Writes a JSON section.
    pub fn json<T: serde::Serialize>(
        &mut self,
        kind: SectionKind,
        value: &T,
    ) -> Result<(), StreamError> {
        let payload = serde_json::to_vec(value)
            .map_err(|e| StreamError::Io(format!("encoding the {} section: {e}", kind.name())))?;
        self.section(kind, &payload)
    }

    /// Writes the End section and flushes; returns the output.
    pub fn finish(mut self) -> Result<W, StreamError> {
        self.section(SectionKind::End, &[])?;
        self.out
            .flush()
            .map_err(|e| StreamError::Io(format!("flushing the stream: {e}")))?;
        Ok(self.out)
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }
}

/// Collects non-zero pages into Memory sections of at most [`MAX_PAGES_PER_SECTION`] pages. Zero pages are
/// dropped (the receiver starts from zeroed RAM), or with [`PageBatch::send_zero_pages`] (later passes of a
/// live migration, where the receiver may hold an older copy) listed in ZeroPages sections.
#[derive(Default)]
pub struct PageBatch {
    buf: Vec<u8>,
    pages: usize,
    zeros: Vec<u8>,
    /// Pages that were zero (elided, or sent as ZeroPages records).
    pub zero_pages: u64,
    /// Non-zero pages sent.
    pub sent_pages: u64,
    /// Whether zero pages are sent as ZeroPages records instead of being dropped.
    pub send_zero_pages: bool,
}

impl PageBatch {
    /// An empty batch; `send_zero_pages` as in [`PageBatch::send_zero_pages`].
    pub fn new(send_zero_pages: bool) -> PageBatch {
        PageBatch {
            send_zero_pages,
            ..PageBatch::default()
        }
    }

    /// Adds the page at `gpa` (page-aligned); zero pages are counted and dropped. Flushes a full batch.
    pub fn add<W: Write>(
        &mut self,
        w: &mut StreamWriter<W>,
        gpa: u64,
        page: &[u8; PAGE_SIZE],
    ) -> Result<(), StreamError> {
        // A slice comparison (memcmp) is fast even in debug builds, unlike a byte loop.
        if page[..] == ZERO_PAGE[..] {
            self.zero_pages += 1;
            if self.send_zero_pages {
                self.zeros.extend_from_slice(&gpa.to_le_bytes());
                if self.zeros.len() == MAX_ZERO_PAGES_PER_SECTION * 8 {
                    w.section(SectionKind::ZeroPages, &self.zeros)?;
                    self.zeros.clear();
                }
            }
            return Ok(());
        }
        self.buf.extend_from_slice(&gpa.to_le_bytes());
        self.buf.extend_from_slice(page);
        self.pages += 1;
        self.sent_pages += 1;
        if self.pages == MAX_PAGES_PER_SECTION {
            self.flush(w)?;
        }
        Ok(())
    }

    /// Writes the pending pages, if any.
    pub fn flush<W: Write>(&mut self, w: &mut StreamWriter<W>) -> Result<(), StreamError> {
        if self.pages > 0 {
            w.section(SectionKind::Memory, &self.buf)?;
            self.buf.clear();
            self.pages = 0;
        }
        if !self.zeros.is_empty() {
            w.section(SectionKind::ZeroPages, &self.zeros)?;
            self.zeros.clear();
        }
        Ok(())
    }
}

/// One section read from a stream (checksum verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Its kind.
    pub kind: SectionKind,
    /// Its payload.
    pub payload: Vec<u8>,
}

impl Section {
    /// Decodes a JSON payload.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, StreamError> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            StreamError::Corrupt(format!(
                "the {} section does not decode: {e}",
                self.kind.name()
            ))
        })
    }

    /// The pages of a Memory section: `(gpa, page)`; each gpa is page-aligned.
    pub fn pages(&self) -> Result<Vec<(u64, &[u8])>, StreamError> {
        if self.kind != SectionKind::Memory || !self.payload.len().is_multiple_of(PAGE_RECORD) {
            return Err(StreamError::Corrupt(format!(
                "a memory section of {} bytes is not a whole number of {PAGE_RECORD}-byte page records",
                self.payload.len()
            )));
        }
        let mut out = Vec::with_capacity(self.payload.len() / PAGE_RECORD);
        for rec in self.payload.chunks_exact(PAGE_RECORD) {
            let (a, page) = rec.split_at(8);
            let mut g = [0u8; 8];
            g.copy_from_slice(a);
            let gpa = u64::from_le_bytes(g);
            if !gpa.is_multiple_of(PAGE_SIZE as u64) {
                return Err(StreamError::Corrupt(format!(
                    "page address {gpa:#x} is not page-aligned"
                )));
            }
            out.push((gpa, page));
        }
        Ok(out)
    }
}

impl Section {
    /// The page addresses of a ZeroPages section; each is page-aligned.
    pub fn zero_pages(&self) -> Result<Vec<u64>, StreamError> {
        if self.kind != SectionKind::ZeroPages || !self.payload.len().is_multiple_of(8) {
            return Err(StreamError::Corrupt(format!(
                "a zero-pages section of {} bytes is not a whole number of 8-byte page addresses",
                self.payload.len()
            )));
        }
        let mut out = Vec::with_capacity(self.payload.len() / 8);
        for a in self.payload.chunks_exact(8) {
            let mut g = [0u8; 8];
            g.copy_from_slice(a);
            let gpa = u64::from_le_bytes(g);
            if !gpa.is_multiple_of(PAGE_SIZE as u64) {
                return Err(StreamError::Corrupt(format!(
                    "page address {gpa:#x} is not page-aligned"
                )));
            }
            out.push(gpa);
        }
        Ok(out)
    }
}

/// Reads a stream, checking the header, lengths and checksums.
pub struct StreamReader<R: Read> {
    input: R,
    read: u64,
    ended: bool,
    /// The header as read.
    pub header: Header,
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the header.
    pub fn new(mut input: R) -> Result<StreamReader<R>, StreamError> {
        let mut fixed = [0u8; 14];
        input
            .read_exact(&mut fixed)
            .map_err(|e| StreamError::io(e, "the header"))?;
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&fixed[..8]);
        if magic != MAGIC {
            return Err(StreamError::BadMagic(magic));
        }
        let format_version = u32::from_le_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]);
        if format_version != FORMAT_VERSION {
            return Err(StreamError::Version {
                found: format_version,
                expected: FORMAT_VERSION,
            });
        }
        let vlen = usize::from(u16::from_le_bytes([fixed[12], fixed[13]]));
        if vlen > MAX_VERSION_STRING {
            return Err(StreamError::Corrupt(format!(
                "the header's version string is {vlen} bytes long (at most {MAX_VERSION_STRING})"
            )));
        }
        let mut v = vec![0u8; vlen];
        input
            .read_exact(&mut v)
            .map_err(|e| StreamError::io(e, "the header"))?;
        let enlighten_version = String::from_utf8(v).map_err(|_| {
            StreamError::Corrupt("the header's version string is not UTF-8".to_string())
        })?;
        Ok(StreamReader {
            input,
            read: 14 + vlen as u64,
            ended: false,
            header: Header {
                format_version,
                enlighten_version,
            },
        })
    }

    /// The next section; `None` after the End section.
    pub fn next_section(&mut self) -> Result<Option<Section>, StreamError> {
        if self.ended {
            return Ok(None);
        }
        let at = self.read;
        let mut h = [0u8; 16];
        self.input
            .read_exact(&mut h)
            .map_err(|e| StreamError::io(e, &format!("a section header at byte {at}")))?;
        let code = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let mut l = [0u8; 8];
        l.copy_from_slice(&h[4..12]);
        let len = u64::from_le_bytes(l);
        let crc = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        let kind = SectionKind::from_code(code).ok_or_else(|| {
            StreamError::Corrupt(format!("unknown section type {code:#x} at byte {at}"))
        })?;
        if len > kind.max_len() {
            return Err(StreamError::Corrupt(format!(
                "{} section at byte {at} claims {len} bytes (at most {})",
                kind.name(),
                kind.max_len()
            )));
        }
        let mut payload = Vec::with_capacity(len as usize);
        let got = (&mut self.input)
            .take(len)
            .read_to_end(&mut payload)
            .map_err(|e| StreamError::Io(format!("reading a {} section: {e}", kind.name())))?;
        if got as u64 != len {
            return Err(StreamError::Truncated(format!(
                "the {} section at byte {at} has {got} of its {len} bytes",
                kind.name()
            )));
        }
        if crc32(&payload) != crc {
            return Err(StreamError::Corrupt(format!(
                "checksum mismatch in the {} section at byte {at}",
                kind.name()
            )));
        }
        self.read += 16 + len;
        if kind == SectionKind::End {
            self.ended = true;
        }
        Ok(Some(Section { kind, payload }))
    }

    /// The next section, which must exist (a stream ends only with its End section).
    pub fn expect_section(&mut self) -> Result<Section, StreamError> {
        self.next_section()?.ok_or_else(|| {
            StreamError::Corrupt("a section was read after the end of the stream".to_string())
        })
    }

    /// Bytes consumed so far.
    pub fn read_bytes(&self) -> u64 {
        self.read
    }
}

/// The source's configuration (the Config section). The destination must match it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConfigSection {
    /// RAM size in bytes.
    pub ram_size: u64,
    /// vCPU count.
    pub vcpus: u32,
    /// Whether the Hyper-V engine runs.
    pub hyperv: bool,
    /// CRC-32 of the canonical guest CPUID table (the enlightenment set and every other feature).
    pub cpuid_digest: u32,
    /// The Hyper-V feature leaves (0x40000003 EAX/EBX/EDX, 0x40000004 EAX), for a readable mismatch report.
    pub hv_features: [u32; 4],
    /// The source's TSC frequency in kHz.
    pub tsc_khz: u32,
    /// `tsc-frequency=` on the source (kHz), if given.
    pub user_tsc_khz: Option<u32>,
}

impl ConfigSection {
    /// Checks that a stream with config `self` can be loaded into a VM with config `dest`; the error names
    /// every mismatch.
    pub fn check_against(&self, dest: &ConfigSection) -> Result<(), StreamError> {
        let mut diffs = Vec::new();
        if self.ram_size != dest.ram_size {
            diffs.push(format!(
                "RAM size: the stream has {} bytes ({} MiB), this VM has {} bytes ({} MiB)",
                self.ram_size,
                self.ram_size >> 20,
                dest.ram_size,
                dest.ram_size >> 20
            ));
        }
        if self.vcpus != dest.vcpus {
            diffs.push(format!(
                "vCPU count: the stream has {}, this VM has {}",
                self.vcpus, dest.vcpus
            ));
        }
        if self.hyperv != dest.hyperv {
            diffs.push(format!(
                "Hyper-V enlightenments: the stream has them {}, this VM has them {}",
                on_off(self.hyperv),
                on_off(dest.hyperv)
            ));
        }
        if self.hv_features != dest.hv_features {
            diffs.push(format!(
                "Hyper-V features (CPUID 0x40000003 EAX/EBX/EDX, 0x40000004 EAX): the stream has {:08x?}, \
                 this VM has {:08x?}",
                self.hv_features, dest.hv_features
            ));
        }
        if self.cpuid_digest != dest.cpuid_digest {
            diffs.push(format!(
                "CPUID: the stream's table digest is {:08x}, this VM's is {:08x} (different -cpu options)",
                self.cpuid_digest, dest.cpuid_digest
            ));
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(StreamError::Mismatch(diffs.join("; ")))
        }
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// CRC-32 over a canonical encoding of a CPUID table (sorted by leaf and subleaf). The fields that name the
/// host CPU the table was read on (initial APIC IDs: 1.EBX[31:24], 0xB/0x1F.EDX, 0x8000001E.EAX) are left out:
/// they differ between two processes on one host and the per-vCPU patches replace them anyway.
pub fn cpuid_digest(entries: &[hyperv::cpuid::CpuidEntry]) -> u32 {
    let mut sorted: Vec<_> = entries.iter().collect();
    sorted.sort_by_key(|e| (e.function, e.index));
    let mut crc = 0;
    for e in sorted {
        let (mut eax, mut ebx, mut edx) = (e.eax, e.ebx, e.edx);
        match e.function {
            1 => ebx &= 0x00FF_FFFF,
            0xB | 0x1F => edx = 0,
            0x8000_001E => eax = 0,
            _ => {}
        }
        for v in [e.function, e.index, e.flags, eax, ebx, e.ecx, edx] {
            crc = crc32_update(crc, &v.to_le_bytes());
        }
    }
    crc
}

/// The Hyper-V feature words compared by [`ConfigSection::check_against`].
pub fn hv_features(entries: &[hyperv::cpuid::CpuidEntry]) -> [u32; 4] {
    let get = |f: u32| entries.iter().find(|e| e.function == f);
    let f3 = get(0x4000_0003);
    let f4 = get(0x4000_0004);
    [
        f3.map_or(0, |e| e.eax),
        f3.map_or(0, |e| e.ebx),
        f3.map_or(0, |e| e.edx),
        f4.map_or(0, |e| e.eax),
    ]
}

#[cfg(test)]
mod tests;
