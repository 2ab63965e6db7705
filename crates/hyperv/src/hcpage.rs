//! The hypercall page the engine writes, and how the VMM recognises a hypercall.
//!
//! KVM writes `vmcall; ret` into the page. On this host VMCALL never reaches userspace (KVM handles it as a KVM
//! hypercall and returns -KVM_ENOSYS), so the engine writes an instruction that exits instead:
//!
//! ```text
//! offset 0:  E6 E4      out  0xE4, al     ; I/O exit to the VMM: port HYPERCALL_PORT, 1 byte, AL ignored
//! offset 2:  C3         ret
//! ```
//!
//! The bytes are identical in 64-bit and 32-bit protected mode, so the same page serves both calling conventions.
//! `out imm8, al` reads AL and writes nothing, and `ret` only pops the return address the guest's `call` pushed,
//! so every register except the ones the VMM writes back (RAX; EDX:EAX in 32-bit mode) is preserved — guests
//! compiled for KVM declare only RAX (and sometimes R8) as clobbered. The rest of the page is left unchanged, as
//! KVM leaves it.
//!
//! On an `out` exit to [`HYPERCALL_PORT`] with size 1, the VMM builds a [`crate::HypercallRegs`] from its
//! synced registers, calls [`crate::Engine::hypercall`] and writes back the returned registers (or injects #UD).
//! KVM has already advanced RIP past the `out`, so the guest continues at the `ret` — unless the VMM performed
//! that `ret` too: the enlighten VMM does so after a completed 64-bit hypercall when the byte at RIP is still
//! [`RET`] and the return address can be read as the processor would (`vmm/src/hv/retfold.rs`), which saves one
//! emulated instruction per call on hosts that emulate guest CPL-0 code.
//!
//! Limitations (documented in `docs/embedding.md`):
//! - Guests that execute VMCALL/VMMCALL directly instead of calling the page cannot be supported on this KVM.
//! - An `out` at CPL > IOPL is checked against the TSS I/O bitmap and may #GP in the guest before any exit; in
//!   Hyper-V a CPL-3 hypercall gets #UD anyway.

/// The private I/O port the hypercall page writes to. It is unused on PC platforms (0x80 POST/io-delay, 0xE9
/// debugcon and 0xED alternative io-delay are avoided).
pub const HYPERCALL_PORT: u8 = 0xE4;

/// The opcode of `out imm8, al`.
pub const OUT_IMM8_AL: u8 = 0xE6;
/// The opcode of `ret` (near).
pub const RET: u8 = 0xC3;

/// The code the engine writes at the start of the hypercall page.
pub const HYPERCALL_PAGE_CODE: [u8; 3] = [OUT_IMM8_AL, HYPERCALL_PORT, RET];

/// Offset of the `out` instruction in the page (the hypercall entry point).
pub const HYPERCALL_ENTRY_OFFSET: u64 = 0;
/// Length of the `out` instruction: a VMM that sees RIP before the instruction advances it by this much.
pub const HYPERCALL_OUT_LEN: u64 = 2;

/// Whether an I/O exit is a hypercall from the page: an `out` of one byte to [`HYPERCALL_PORT`].
pub fn is_hypercall_port_exit(port: u16, size: usize, is_write: bool) -> bool {
    is_write && size == 1 && port == u16::from(HYPERCALL_PORT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_bytes() {
        assert_eq!(HYPERCALL_PAGE_CODE, [0xE6, 0xE4, 0xC3]);
        assert_eq!(HYPERCALL_OUT_LEN as usize, HYPERCALL_PAGE_CODE.len() - 1);
    }

    #[test]
    fn port_exit_recognition() {
        let cases = [
            (0xE4u16, 1usize, true, true),
            (0xE4, 1, false, false),
            (0xE4, 2, true, false),
            (0xE4, 4, true, false),
            (0xE5, 1, true, false),
            (0x3000, 1, true, false),
            (0x01E4, 1, true, false),
        ];
        for (port, size, w, want) in cases {
            assert_eq!(
                is_hypercall_port_exit(port, size, w),
                want,
                "{port:#x} {size} {w}"
            );
        }
    }
}
