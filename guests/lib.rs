//! Guest programs compiled from C by `build.rs`. See `guests/README.md`.
//!
//! Every program exists in two forms built from the same code:
//! - a Multiboot v1 ELF32 image ([`kernel_path`]) that QEMU's `-kernel` and enlighten's multiboot loader boot;
//! - the 64-bit ELF as linked ([`elf64_path`]), whose entry expects long mode with the low 4 GiB identity
//!   mapped, CPL 0, interrupts off, RAX = 0x2BADB002 and RBX = the Multiboot info address.

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// Path of the Multiboot (ELF32) image of guest program `name`, e.g. `"smp"`.
pub fn kernel_path(name: &str) -> Option<&'static str> {
    PROGRAMS.iter().find(|p| p.0 == name).map(|p| p.1)
}

/// Path of the ELF64 (long-mode entry) image of guest program `name`.
pub fn elf64_path(name: &str) -> Option<&'static str> {
    PROGRAMS.iter().find(|p| p.0 == name).map(|p| p.2)
}

/// The built-in demo guest as a Multiboot v1 ELF32 image (what `enlighten` boots without `-kernel`).
pub fn demo() -> &'static [u8] {
    DEMO_ELF32
}

/// The built-in demo guest as an ELF64 image with the long-mode entry.
pub fn demo_elf64() -> &'static [u8] {
    DEMO_ELF64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_has_both_images() {
        assert!(NAMES.contains(&"hello"));
        for name in NAMES {
            for path in [kernel_path(name), elf64_path(name)] {
                let path = path.unwrap_or_else(|| panic!("{name} has no path"));
                let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
                assert_eq!(&bytes[..4], b"\x7fELF", "{path}");
            }
            let elf32 = std::fs::read(kernel_path(name).unwrap_or_default()).unwrap_or_default();
            assert_eq!(elf32[4], 1, "{name}: Multiboot image must be ELFCLASS32");
            assert_eq!(
                u16::from_le_bytes([elf32[18], elf32[19]]),
                3,
                "{name}: e_machine must be EM_386"
            );
            // The Multiboot header must be 4-byte aligned within the first 8192 bytes.
            let found = elf32[..elf32.len().min(8192)]
                .chunks_exact(4)
                .any(|w| w == 0x1BAD_B002u32.to_le_bytes());
            assert!(found, "{name}: Multiboot header not in the first 8 KiB");
            let elf64 = std::fs::read(elf64_path(name).unwrap_or_default()).unwrap_or_default();
            assert_eq!(elf64[4], 2, "{name}: ELF64 image must be ELFCLASS64");
        }
        assert!(kernel_path("no-such-program").is_none());
    }

    #[test]
    fn demo_is_embedded() {
        if NAMES.contains(&"demo") {
            assert_eq!(&demo()[..4], b"\x7fELF");
            assert_eq!(&demo_elf64()[..4], b"\x7fELF");
        }
    }
}
