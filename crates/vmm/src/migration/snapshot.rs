//! Firecracker-style snapshots: a small, checksummed **state file** plus a raw **memory file**.
//!
//! The state file is a migration stream ([`super::format`]) with the Config, Vcpu, Device and Engine sections
//! a live migration sends (written by `vm::write_state`), and one MemoryFile section
//! ([`MemoryFileSection`]) in place of the Memory sections.
//! The memory file is guest RAM as it is, region after region (file offset = RAM offset, not guest physical
//! address, so the hole below 4 GiB costs nothing); zero pages are left as holes, so the file is sparse.
//!
//! Restoring maps the memory file `MAP_PRIVATE` over guest RAM: pages are read lazily on first touch and
//! copied on first write, so restore latency does not depend on RAM size. Because the state file is a stream,
//! `-incoming file:STATE` restores a snapshot too ([`super::vm::restore`] maps the file when it meets the
//! MemoryFile section).
//!
//! The state file records where the memory file is twice: its absolute path when it was written, and its path
//! relative to the state file's directory, so that the pair can move to another directory together. Restore
//! looks next to the state file first, then at the absolute path, unless it is told the memory file's path
//! ([`MemoryFileOptions::memory`], `enlighten restore STATE MEMORY`). The state file also records the
//! memory file's CRC32, computed while it is written; [`MemoryFileOptions::verify`] (`enlighten restore
//! --verify-memory`) reads the whole file and checks it before the guest runs. By default nothing is read, so
//! restore latency stays independent of the RAM size.
//!
//! A save writes the memory file first and renames it into place, then the state file: a save that fails
//! in between leaves the previous state file next to the new memory file. So that a lazy restore (which
//! reads no RAM) does not map such a mixed pair, each save draws a random 128-bit snapshot id
//! ([`SnapshotId`]), records it in the MemoryFile section and writes it in a 32-byte trailer after the RAM
//! image ([`MemoryTrailer`]); restore reads the trailer (one 32-byte read) and refuses a memory file whose id
//! is not the state file's. The mapping covers only the RAM image. A state file without an id (an older
//! enlighten) expects a memory file of exactly the RAM size, as before, and is not checked.
//!
//! The memory file must not change while a VM restored from it runs: a private mapping still shows the file's
//! later changes in pages the guest has not written. [`write_memory_file`] therefore writes a new file and
//! renames it over the old one, so a running VM keeps the inode it mapped.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Component;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::format::{ConfigSection, SectionKind, StreamError, StreamWriter, PAGE_SIZE};
use super::vm::{write_state, MigrationError, Progress, Stats};
use crate::hv::HvGlue;
use crate::layout::MemoryLayout;
use crate::machine::{Paused, VmShared};

/// The MemoryFile section's schema version.
pub const MEMORY_FILE_VERSION: u32 = 1;

/// One RAM region's place in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryFileRegion {
    /// Guest physical address of the region.
    pub gpa: u64,
    /// Its size in bytes.
    pub size: u64,
    /// Its offset in the memory file.
    pub offset: u64,
}

/// The MemoryFile section of a snapshot's state file. `relative` and `crc32` came after version 1's first
/// form: a state file without them still restores (it cannot be verified).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryFileSection {
    /// [`MEMORY_FILE_VERSION`].
    pub version: u32,
    /// The memory file, as an absolute path when it was written.
    pub path: String,
    /// The memory file's path relative to the state file's directory (lexical, `..` where needed).
    #[serde(default)]
    pub relative: Option<String>,
    /// CRC32 (IEEE, `crc32fast`) of the memory file's RAM image (the trailer excluded), holes read as zeros.
    #[serde(default)]
    pub crc32: Option<u32>,
    /// The snapshot id (32 lowercase hex digits, [`SnapshotId`]) that the memory file's trailer repeats. A
    /// state file without it (an older enlighten) has a memory file without trailer.
    #[serde(default)]
    pub id: Option<String>,
    /// The RAM image's size in bytes (the RAM size; with an `id` the file is [`MEMORY_TRAILER_LEN`] longer).
    pub size: u64,
    /// How the file maps onto guest RAM.
    pub regions: Vec<MemoryFileRegion>,
    /// Non-zero pages written when the snapshot was taken (information only).
    pub pages: u64,
}

/// A random 128-bit id that ties a snapshot's state file to its memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SnapshotId(pub [u8; 16]);

impl SnapshotId {
    /// 16 bytes from the kernel's random source.
    pub fn random() -> std::io::Result<SnapshotId> {
        use std::io::Read;
        let mut b = [0u8; 16];
        File::open("/dev/urandom")?.read_exact(&mut b)?;
        Ok(SnapshotId(b))
    }

    /// 32 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses [`SnapshotId::to_hex`]'s form (exactly 32 hex digits, either case).
    pub fn from_hex(s: &str) -> Result<SnapshotId, String> {
        let bad = || format!("the snapshot id {s:?} is not 32 hex digits");
        if s.len() != 32 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut b = [0u8; 16];
        for (i, out) in b.iter_mut().enumerate() {
            *out = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(SnapshotId(b))
    }
}

/// Length of the trailer after the RAM image in a memory file with a snapshot id.
pub const MEMORY_TRAILER_LEN: u64 = 32;
/// The trailer's first 8 bytes.
pub const MEMORY_TRAILER_MAGIC: [u8; 8] = *b"ENLMEMID";

/// The trailer after a memory file's RAM image: `magic[8] | RAM image size u64 LE | snapshot id[16]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryTrailer {
    /// The RAM image's size (the offset of the trailer).
    pub size: u64,
    /// The snapshot id.
    pub id: SnapshotId,
}

impl MemoryTrailer {
    /// The trailer's bytes.
    pub fn encode(&self) -> [u8; MEMORY_TRAILER_LEN as usize] {
        let mut b = [0u8; MEMORY_TRAILER_LEN as usize];
        b[..8].copy_from_slice(&MEMORY_TRAILER_MAGIC);
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..].copy_from_slice(&self.id.0);
        b
    }

    /// Decodes a trailer; `None` when the magic is missing.
    pub fn decode(b: &[u8; MEMORY_TRAILER_LEN as usize]) -> Option<MemoryTrailer> {
        if b[..8] != MEMORY_TRAILER_MAGIC {
            return None;
        }
        let mut size = [0u8; 8];
        size.copy_from_slice(&b[8..16]);
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[16..]);
        Some(MemoryTrailer {
            size: u64::from_le_bytes(size),
            id: SnapshotId(id),
        })
    }
}

fn vm_err(e: impl std::fmt::Display) -> MigrationError {
    MigrationError::Vm(e.to_string())
}

/// The regions of `layout`, laid out one after the other in a memory file.
pub fn file_regions(layout: &MemoryLayout) -> Vec<MemoryFileRegion> {
    let mut offset = 0;
    layout
        .regions
        .iter()
        .map(|r| {
            let e = MemoryFileRegion {
                gpa: r.start,
                size: r.size,
                offset,
            };
            offset += r.size;
            e
        })
        .collect()
}

/// Bytes read from guest RAM at a time while writing the memory file.
const CHUNK: usize = 2 << 20;

/// What [`write_memory_file`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryFileWritten {
    /// Non-zero pages (written).
    pub pages: u64,
    /// Zero pages (left as holes).
    pub zero_pages: u64,
    /// CRC32 of the whole file (see [`MemoryFileSection::crc32`]).
    pub crc32: u32,
}

/// Writes guest RAM to `path` as a sparse raw file (zero pages are holes), followed by the trailer with `id`
/// when there is one: into a new file next to `path`, then renamed over it. The CRC32 is computed on the way,
/// from the bytes read (the RAM image only).
pub fn write_memory_file(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    path: &Path,
    id: Option<SnapshotId>,
    progress: Progress<'_>,
) -> Result<MemoryFileWritten, MigrationError> {
    let tmp = temp_name(path);
    let r = write_sparse(mem, layout, &tmp, id, progress).and_then(|counts| {
        std::fs::rename(&tmp, path).map_err(|e| {
            vm_err(format!(
                "cannot rename {} to {}: {e}",
                tmp.display(),
                path.display()
            ))
        })?;
        Ok(counts)
    });
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

fn temp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

fn write_sparse(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    path: &Path,
    id: Option<SnapshotId>,
    progress: Progress<'_>,
) -> Result<MemoryFileWritten, MigrationError> {
    let io = |what: &str, e: std::io::Error| vm_err(format!("{what} {}: {e}", path.display()));
    let f = File::create(path).map_err(|e| io("cannot create", e))?;
    // A file of the right size made of holes; only non-zero pages are written.
    f.set_len(layout.ram_size)
        .map_err(|e| io("cannot size", e))?;
    if let Some(id) = id {
        let trailer = MemoryTrailer {
            size: layout.ram_size,
            id,
        };
        f.write_all_at(&trailer.encode(), layout.ram_size)
            .map_err(|e| io("cannot write the trailer of", e))?;
    }
    // Two stages, so that copying and scanning guest RAM overlaps with the writes (page-cache writes are the
    // slower half): this thread reads chunks and finds their runs of non-zero pages, a writer thread writes
    // them. Buffers go back and forth, so at most `BUFFERS` chunks exist.
    const BUFFERS: usize = 3;
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Chunk>(BUFFERS);
    let (free_tx, free_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(BUFFERS);
    for _ in 0..BUFFERS {
        let _ = free_tx.send(vec![0u8; CHUNK]);
    }
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<(), std::io::Error> {
            for c in full_rx {
                for &(start, end) in &c.runs {
                    f.write_all_at(&c.buf[start..end], c.offset + start as u64)?;
                }
                // The reader may have stopped; then the buffer is simply dropped.
                let _ = free_tx.send(c.buf);
            }
            Ok(())
        });
        let read = (|| -> Result<MemoryFileWritten, MigrationError> {
            let zero = [0u8; PAGE_SIZE];
            let (mut pages, mut zero_pages, mut done) = (0u64, 0u64, 0u64);
            let mut crc = crc32fast::Hasher::new();
            let written = |pages, zero_pages, crc: crc32fast::Hasher| MemoryFileWritten {
                pages,
                zero_pages,
                crc32: crc.finalize(),
            };
            for r in file_regions(layout) {
                let mut at = 0u64;
                while at < r.size {
                    let len = (r.size - at).min(CHUNK as u64) as usize;
                    // No free buffer: the writer failed (its error is reported below).
                    let Ok(mut buf) = free_rx.recv() else {
                        return Ok(written(pages, zero_pages, crc));
                    };
                    mem.read_slice(&mut buf[..len], GuestAddress(r.gpa + at))
                        .map_err(|e| {
                            vm_err(format!("cannot read guest RAM at {:#x}: {e}", r.gpa + at))
                        })?;
                    // File order: regions one after the other, each from its start.
                    crc.update(&buf[..len]);
                    let mut runs = Vec::new();
                    let mut run_start: Option<usize> = None;
                    for (i, page) in buf[..len].chunks(PAGE_SIZE).enumerate() {
                        if page == &zero[..page.len()] {
                            zero_pages += 1;
                            if let Some(s) = run_start.take() {
                                runs.push((s, i * PAGE_SIZE));
                            }
                        } else {
                            pages += 1;
                            run_start.get_or_insert(i * PAGE_SIZE);
                        }
                    }
                    if let Some(s) = run_start {
                        runs.push((s, len));
                    }
                    let chunk = Chunk {
                        buf,
                        offset: r.offset + at,
                        runs,
                    };
                    if full_tx.send(chunk).is_err() {
                        return Ok(written(pages, zero_pages, crc));
                    }
                    at += len as u64;
                    done += len as u64;
                    if done.is_multiple_of(64 << 20) {
                        progress(done, layout.ram_size);
                    }
                }
            }
            Ok(written(pages, zero_pages, crc))
        })();
        drop(full_tx);
        let written = match writer.join() {
            Ok(r) => r.map_err(|e| io("cannot write", e)),
            Err(_) => Err(vm_err("the memory file writer thread panicked")),
        };
        let counts = read?;
        written?;
        progress(layout.ram_size, layout.ram_size);
        Ok(counts)
    })
}

/// A chunk of guest RAM on its way to the memory file: the runs `[start, end)` of `buf` to write at
/// `offset + start`.
struct Chunk {
    buf: Vec<u8>,
    offset: u64,
    runs: Vec<(usize, usize)>,
}

/// Takes a snapshot of the paused machine: the state sections (see `vm::write_state`) and a MemoryFile
/// section go to `state`, guest RAM to the raw file `memory`. `state_path` is where the state file will end
/// up (it may be written elsewhere first and renamed): the MemoryFile section records `memory` relative to
/// its directory as well as absolute. `paused` must cover every vCPU. `Stats::bytes` counts the state file
/// and the memory file's data (not its holes).
pub fn save_snapshot<W: Write>(
    paused: &Paused,
    hv: Option<&HvGlue>,
    config: &ConfigSection,
    state: W,
    state_path: &Path,
    memory: &Path,
    progress: Progress<'_>,
) -> Result<(W, Stats), MigrationError> {
    let absolute =
        |p: &Path| std::path::absolute(p).map_err(|e| vm_err(format!("{}: {e}", p.display())));
    let memory = absolute(memory)?;
    let utf8 = |p: &Path| {
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| vm_err(format!("{}: not a UTF-8 path", p.display())))
    };
    let path = utf8(&memory)?;
    let state_dir = absolute(state_path)?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let relative = relative_path(&state_dir, &memory)
        .map(|r| utf8(&r))
        .transpose()?;
    let id = SnapshotId::random().map_err(|e| vm_err(format!("cannot draw a snapshot id: {e}")))?;
    let shared = paused.machine().clone();
    let epoch = shared.ram_epoch();
    // A reset still queued on the vCPUs is refused before any file is written, one that runs while the
    // vCPUs are held here after (see `no_reset_overlap`).
    super::vm::no_reset_overlap(&shared, epoch)?;
    let mut w = StreamWriter::new(state)?;
    write_state(paused, hv, config, &mut w)?;
    let written = write_memory_file(&shared.mem, &shared.layout, &memory, Some(id), progress)?;
    super::vm::no_reset_overlap(&shared, epoch)?;
    w.json(
        SectionKind::MemoryFile,
        &MemoryFileSection {
            version: MEMORY_FILE_VERSION,
            path,
            relative,
            crc32: Some(written.crc32),
            id: Some(id.to_hex()),
            size: shared.layout.ram_size,
            regions: file_regions(&shared.layout),
            pages: written.pages,
        },
    )?;
    let bytes = w.written() + 16 + written.pages * PAGE_SIZE as u64;
    let out = w.finish()?;
    Ok((
        out,
        Stats {
            bytes,
            pages: written.pages,
            zero_pages: written.zero_pages,
        },
    ))
}

/// `to` relative to the directory `from`, lexically (both absolute and normalised, as
/// `std::path::absolute` makes them): `vm.mem`, `mem/vm.mem` or `../mem/vm.mem`. `None` when there is no
/// such path (another root or prefix, or `..` left in `from`).
pub fn relative_path(from: &Path, to: &Path) -> Option<PathBuf> {
    let from: Vec<Component<'_>> = from.components().collect();
    let to: Vec<Component<'_>> = to.components().collect();
    if from.first() != to.first() || from.contains(&Component::ParentDir) {
        return None;
    }
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut r = PathBuf::new();
    for _ in common..from.len() {
        r.push("..");
    }
    for c in &to[common..] {
        r.push(c.as_os_str());
    }
    (!r.as_os_str().is_empty()).then_some(r)
}

/// How a restore finds and checks a snapshot's memory file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryFileOptions {
    /// The state file's directory (`-incoming file:STATE`): the memory file is looked for there first, at
    /// the path the snapshot recorded relative to it.
    pub state_dir: Option<PathBuf>,
    /// The memory file, given by the user: used as it is, nothing else is tried.
    pub memory: Option<PathBuf>,
    /// Read the whole memory file and check its CRC32 before mapping it.
    pub verify: bool,
}

/// The paths a restore tries for the memory file, in order, each with how it was found: the path given
/// (alone), or the recorded relative path under the state file's directory, then the recorded path (once).
pub fn memory_candidates(
    m: &MemoryFileSection,
    opts: &MemoryFileOptions,
) -> Vec<(PathBuf, &'static str)> {
    if let Some(p) = &opts.memory {
        return vec![(p.clone(), "as given")];
    }
    let mut c = Vec::new();
    if let (Some(rel), Some(dir)) = (&m.relative, &opts.state_dir) {
        c.push((dir.join(rel), "next to the state file"));
    }
    let recorded = PathBuf::from(&m.path);
    if !c.iter().any(|(p, _)| *p == recorded) {
        c.push((recorded, "where it was written"));
    }
    c
}

/// The checks of a MemoryFile section that need no file: its version, its layout against this machine's,
/// its snapshot id. Returns the id and the memory file's expected length (the RAM image, plus the trailer
/// when there is an id).
pub fn check_section(
    layout: &MemoryLayout,
    m: &MemoryFileSection,
) -> Result<(Option<SnapshotId>, u64), MigrationError> {
    if m.version != MEMORY_FILE_VERSION {
        return Err(StreamError::Mismatch(format!(
            "the snapshot's memory file section has version {} (this build reads version \
             {MEMORY_FILE_VERSION})",
            m.version
        ))
        .into());
    }
    let expected = file_regions(layout);
    if m.size != layout.ram_size || m.regions != expected {
        return Err(StreamError::Mismatch(format!(
            "the snapshot's memory layout ({} bytes in {:?}) is not this VM's ({} bytes in {:?})",
            m.size, m.regions, layout.ram_size, expected
        ))
        .into());
    }
    let id =
        m.id.as_deref()
            .map(SnapshotId::from_hex)
            .transpose()
            .map_err(StreamError::Corrupt)?;
    let len = if id.is_some() {
        m.size
            .checked_add(MEMORY_TRAILER_LEN)
            .ok_or_else(|| StreamError::Corrupt(format!("a memory file of {} bytes", m.size)))?
    } else {
        m.size
    };
    Ok((id, len))
}

/// Checks a MemoryFile section against this machine, finds the file on disk and checks it (its size, its
/// trailer's snapshot id, and with `opts.verify` its CRC32). Returns the opened file and its path.
fn check_memory_file(
    layout: &MemoryLayout,
    m: &MemoryFileSection,
    opts: &MemoryFileOptions,
) -> Result<(File, PathBuf), MigrationError> {
    let (id, len) = check_section(layout, m)?;
    let candidates = memory_candidates(m, opts);
    let mut tried = Vec::new();
    let mut found = None;
    for (p, how) in candidates {
        match File::open(&p) {
            Ok(f) => {
                found = Some((f, p));
                break;
            }
            Err(e) => tried.push(format!("{} ({how}): {e}", p.display())),
        }
    }
    let Some((f, path)) = found else {
        return Err(vm_err(format!(
            "cannot open the snapshot's memory file: {}; give its path with `enlighten restore STATE \
             MEMORY`",
            tried.join("; ")
        )));
    };
    let shown = path.display();
    let meta = f.metadata().map_err(|e| vm_err(format!("{shown}: {e}")))?;
    if !meta.is_file() {
        return Err(vm_err(format!(
            "the snapshot's memory file {shown} is not a regular file"
        )));
    }
    if id.is_some() && meta.len() == m.size {
        return Err(vm_err(format!(
            "the snapshot's memory file {shown} has no snapshot id (written by an older enlighten, or \
             truncated): not this snapshot's memory file"
        )));
    }
    if meta.len() != len {
        let trailer = if id.is_some() {
            format!(" + a {MEMORY_TRAILER_LEN}-byte trailer")
        } else {
            String::new()
        };
        return Err(vm_err(format!(
            "the snapshot's memory file {shown} is {} bytes, the snapshot needs {len} bytes ({} MiB of \
             RAM{trailer}): truncated or not this snapshot's memory file",
            meta.len(),
            m.size >> 20
        )));
    }
    if let Some(want) = id {
        check_trailer(&f, &path, m.size, want)?;
    }
    if opts.verify {
        verify_memory_file(&f, &path, m)?;
    }
    Ok((f, path))
}

/// Reads the trailer at `size` and compares its snapshot id with the state file's (one 32-byte read).
fn check_trailer(f: &File, path: &Path, size: u64, want: SnapshotId) -> Result<(), MigrationError> {
    let mut b = [0u8; MEMORY_TRAILER_LEN as usize];
    f.read_exact_at(&mut b, size).map_err(|e| {
        vm_err(format!(
            "cannot read the snapshot id of the memory file {}: {e}",
            path.display()
        ))
    })?;
    let mixed = |what: String| {
        vm_err(format!(
            "the memory file {} does not belong to this state file ({what}; the state file's is {}): the \
             pair comes from two different saves (a save that failed after replacing the memory file leaves \
             such a pair); restore a state file with the memory file written by the same save",
            path.display(),
            want.to_hex()
        ))
    };
    match MemoryTrailer::decode(&b) {
        None => Err(mixed("it has no snapshot id trailer".to_string())),
        Some(t) if t.size != size => Err(mixed(format!(
            "its trailer is for {} bytes of RAM, not {size}",
            t.size
        ))),
        Some(t) if t.id != want => Err(mixed(format!("its snapshot id is {}", t.id.to_hex()))),
        Some(_) => Ok(()),
    }
}

/// Reads the RAM image of the memory file and compares its CRC32 with the one the snapshot recorded.
fn verify_memory_file(f: &File, path: &Path, m: &MemoryFileSection) -> Result<(), MigrationError> {
    let Some(want) = m.crc32 else {
        return Err(vm_err(format!(
            "cannot verify the snapshot's memory file {}: the state file records no checksum (written by \
             an older enlighten)",
            path.display()
        )));
    };
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    while at < m.size {
        let len = (m.size - at).min(CHUNK as u64) as usize;
        f.read_exact_at(&mut buf[..len], at).map_err(|e| {
            vm_err(format!(
                "cannot verify the snapshot's memory file {}: reading {len} bytes at offset {at}: {e}",
                path.display()
            ))
        })?;
        crc.update(&buf[..len]);
        at += len as u64;
    }
    let got = crc.finalize();
    if got != want {
        return Err(vm_err(format!(
            "the snapshot's memory file {} is damaged: its CRC32 is {got:#010x}, the snapshot recorded \
             {want:#010x}",
            path.display()
        )));
    }
    Ok(())
}

/// Maps a snapshot's memory file copy-on-write over guest RAM. Called by [`super::vm::restore`] on a machine
/// whose vCPUs are all held and have not run guest code since it was created. Returns the number of pages
/// the snapshot wrote (information only): nothing is read here unless `opts.verify` asks for it.
pub(crate) fn map_memory_file(
    shared: &VmShared,
    m: &MemoryFileSection,
    opts: &MemoryFileOptions,
) -> Result<u64, MigrationError> {
    map_into(&shared.mem, &shared.layout, m, opts)
}

fn map_into(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    m: &MemoryFileSection,
    opts: &MemoryFileOptions,
) -> Result<u64, MigrationError> {
    let (f, path) = check_memory_file(layout, m, opts)?;
    for r in &m.regions {
        let host = mem
            .get_host_address(GuestAddress(r.gpa))
            .map_err(|e| vm_err(format!("guest RAM at {:#x}: {e}", r.gpa)))?;
        let size = usize::try_from(r.size).map_err(vm_err)?;
        let offset = libc::off_t::try_from(r.offset).map_err(vm_err)?;
        // SAFETY: [host, host + size) is exactly the mapping `mem` made for this RAM region (the region list
        // was checked against the machine's layout above), so MAP_FIXED replaces only guest RAM. Every vCPU is
        // held and nothing holds a Rust reference into guest RAM; KVM's memory slot keeps the same host
        // address and sees the new pages through its MMU notifier. `mem` still unmaps the range on drop.
        let p = unsafe {
            libc::mmap(
                host.cast(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                f.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED || p != host.cast() {
            return Err(vm_err(format!(
                "cannot map the snapshot's memory file {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(m.pages)
}

/// Replaces guest RAM with fresh zero pages (a reset, or before a stream's pages are loaded). Unlike
/// `MADV_DONTNEED`, this also clears RAM that a snapshot's memory file backs. Every vCPU must be stopped.
pub(crate) fn clear_ram(mem: &GuestMemoryMmap, layout: &MemoryLayout) -> Result<(), String> {
    for r in &layout.regions {
        let host = mem
            .get_host_address(GuestAddress(r.start))
            .map_err(|e| format!("cannot clear guest RAM: {e}"))?;
        let size = usize::try_from(r.size).map_err(|e| format!("cannot clear guest RAM: {e}"))?;
        // SAFETY: [host, host + size) is the mapping `mem` owns for this RAM region (its host address for the
        // region's start, and the region's size); MAP_FIXED replaces it with an anonymous private mapping of
        // the same size, which `mem` still unmaps on drop. Every vCPU is stopped and nothing holds a Rust
        // reference into guest RAM.
        let p = unsafe {
            libc::mmap(
                host.cast(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED || p != host.cast() {
            return Err(format!(
                "cannot clear guest RAM: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
