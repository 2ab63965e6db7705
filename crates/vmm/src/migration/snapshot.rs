//! Firecracker-style snapshots: a small, checksummed **state file** plus a raw **memory file**.
//!
//! The state file is a migration stream ([`super::format`]) with the Config, Vcpu, Device and Engine sections
//! of [`super::vm::save`], and one MemoryFile section ([`MemoryFileSection`]) in place of the Memory sections.
//! The memory file is guest RAM as it is, region after region (file offset = RAM offset, not guest physical
//! address, so the hole below 4 GiB costs nothing); zero pages are left as holes, so the file is sparse.
//!
//! Restoring maps the memory file `MAP_PRIVATE` over guest RAM: pages are read lazily on first touch and
//! copied on first write, so restore latency does not depend on RAM size. Because the state file is a stream,
//! `-incoming file:STATE` restores a snapshot too ([`super::vm::restore`] maps the file when it meets the
//! MemoryFile section).
//!
//! The memory file must not change while a VM restored from it runs: a private mapping still shows the file's
//! later changes in pages the guest has not written. [`write_memory_file`] therefore writes a new file and
//! renames it over the old one, so a running VM keeps the inode it mapped.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
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

/// The MemoryFile section of a snapshot's state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryFileSection {
    /// [`MEMORY_FILE_VERSION`].
    pub version: u32,
    /// The memory file, as an absolute path.
    pub path: String,
    /// The memory file's size in bytes (the RAM size).
    pub size: u64,
    /// How the file maps onto guest RAM.
    pub regions: Vec<MemoryFileRegion>,
    /// Non-zero pages written when the snapshot was taken (information only).
    pub pages: u64,
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

/// Writes guest RAM to `path` as a sparse raw file (zero pages are holes): into a new file next to `path`,
/// then renamed over it. Returns `(non-zero pages, zero pages)`.
pub fn write_memory_file(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    path: &Path,
    progress: Progress<'_>,
) -> Result<(u64, u64), MigrationError> {
    let tmp = temp_name(path);
    let r = write_sparse(mem, layout, &tmp, progress).and_then(|counts| {
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
    progress: Progress<'_>,
) -> Result<(u64, u64), MigrationError> {
    let io = |what: &str, e: std::io::Error| vm_err(format!("{what} {}: {e}", path.display()));
    let f = File::create(path).map_err(|e| io("cannot create", e))?;
    // A file of the right size made of holes; only non-zero pages are written.
    f.set_len(layout.ram_size)
        .map_err(|e| io("cannot size", e))?;
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
        let read = (|| -> Result<(u64, u64), MigrationError> {
            let zero = [0u8; PAGE_SIZE];
            let (mut pages, mut zero_pages, mut done) = (0u64, 0u64, 0u64);
            for r in file_regions(layout) {
                let mut at = 0u64;
                while at < r.size {
                    let len = (r.size - at).min(CHUNK as u64) as usize;
                    // No free buffer: the writer failed (its error is reported below).
                    let Ok(mut buf) = free_rx.recv() else {
                        return Ok((pages, zero_pages));
                    };
                    mem.read_slice(&mut buf[..len], GuestAddress(r.gpa + at))
                        .map_err(|e| {
                            vm_err(format!("cannot read guest RAM at {:#x}: {e}", r.gpa + at))
                        })?;
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
                        return Ok((pages, zero_pages));
                    }
                    at += len as u64;
                    done += len as u64;
                    if done.is_multiple_of(64 << 20) {
                        progress(done, layout.ram_size);
                    }
                }
            }
            Ok((pages, zero_pages))
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

/// Takes a snapshot of the paused machine: the state sections (see [`super::vm::save`]) and a MemoryFile
/// section go to `state`, guest RAM to the raw file `memory` (made absolute). `paused` must cover every vCPU.
/// `Stats::bytes` counts the state file and the memory file's data (not its holes).
pub fn save_snapshot<W: Write>(
    paused: &Paused,
    hv: Option<&HvGlue>,
    config: &ConfigSection,
    state: W,
    memory: &Path,
    progress: Progress<'_>,
) -> Result<(W, Stats), MigrationError> {
    let memory =
        std::path::absolute(memory).map_err(|e| vm_err(format!("{}: {e}", memory.display())))?;
    let path = memory
        .to_str()
        .ok_or_else(|| vm_err(format!("{}: not a UTF-8 path", memory.display())))?
        .to_string();
    let shared = paused.machine().clone();
    let mut w = StreamWriter::new(state)?;
    write_state(paused, hv, config, &mut w)?;
    let (pages, zero_pages) = write_memory_file(&shared.mem, &shared.layout, &memory, progress)?;
    w.json(
        SectionKind::MemoryFile,
        &MemoryFileSection {
            version: MEMORY_FILE_VERSION,
            path,
            size: shared.layout.ram_size,
            regions: file_regions(&shared.layout),
            pages,
        },
    )?;
    let bytes = w.written() + 16 + pages * PAGE_SIZE as u64;
    let out = w.finish()?;
    Ok((
        out,
        Stats {
            bytes,
            pages,
            zero_pages,
        },
    ))
}

/// Checks a MemoryFile section against this machine and the file on disk. Returns the opened file.
fn check_memory_file(layout: &MemoryLayout, m: &MemoryFileSection) -> Result<File, MigrationError> {
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
    let f = File::open(&m.path).map_err(|e| {
        vm_err(format!(
            "cannot open the snapshot's memory file {}: {e}",
            m.path
        ))
    })?;
    let meta = f
        .metadata()
        .map_err(|e| vm_err(format!("{}: {e}", m.path)))?;
    if !meta.is_file() {
        return Err(vm_err(format!(
            "the snapshot's memory file {} is not a regular file",
            m.path
        )));
    }
    if meta.len() != m.size {
        return Err(vm_err(format!(
            "the snapshot's memory file {} is {} bytes, the snapshot needs {} bytes ({} MiB of RAM): \
             truncated or not this snapshot's memory file",
            m.path,
            meta.len(),
            m.size,
            m.size >> 20
        )));
    }
    Ok(f)
}

/// Maps a snapshot's memory file copy-on-write over guest RAM. Called by [`super::vm::restore`] on a machine
/// whose vCPUs are all held and have not run guest code since it was created. Returns the number of pages
/// the snapshot wrote (information only): nothing is read here.
pub(crate) fn map_memory_file(
    shared: &VmShared,
    m: &MemoryFileSection,
) -> Result<u64, MigrationError> {
    map_into(&shared.mem, &shared.layout, m)
}

fn map_into(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    m: &MemoryFileSection,
) -> Result<u64, MigrationError> {
    let f = check_memory_file(layout, m)?;
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
                m.path,
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
