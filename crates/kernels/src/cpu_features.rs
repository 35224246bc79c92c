//! The CPU's bf16 matrix units, as a CPU bf16 path would need them.
//!
//! `train.precision: "bf16"` on the CPU means PyTorch's CPU autocast: bf16 operands, f32
//! accumulation. That only pays where the CPU multiplies bf16 in hardware — AMX tiles
//! (`TDPBF16PS`) or AVX512-BF16 dot products (`VDPBF16PS`) — so the runner asks this module
//! before it accepts bf16 on the CPU, and names what is missing when it refuses.

use std::fmt;

/// Which bf16 multiply units the CPU has and the operating system lets a process use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuBf16Units {
    /// AMX with the BF16 tile multiply, and the OS saving the tile state (XCR0 bits 17-18).
    /// A Linux process must still request the tile data once (`arch_prctl`) before use.
    pub amx_bf16: bool,
    /// AVX512-BF16 (`VDPBF16PS`), with the OS saving the AVX-512 state.
    pub avx512_bf16: bool,
}

impl CpuBf16Units {
    /// Whether any bf16 multiply unit is usable.
    pub fn any(self) -> bool {
        self.amx_bf16 || self.avx512_bf16
    }
}

impl fmt::Display for CpuBf16Units {
    /// `AMX-BF16 and AVX512-BF16`, one of them, or `neither AMX-BF16 nor AVX512-BF16`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.amx_bf16, self.avx512_bf16) {
            (true, true) => f.write_str("AMX-BF16 and AVX512-BF16"),
            (true, false) => f.write_str("AMX-BF16 (no AVX512-BF16)"),
            (false, true) => f.write_str("AVX512-BF16 (no AMX-BF16)"),
            (false, false) => f.write_str("neither AMX-BF16 nor AVX512-BF16"),
        }
    }
}

/// The bf16 units of the CPU this process runs on (CPUID, and XCR0 for the OS's part).
pub fn cpu_bf16_units() -> CpuBf16Units {
    detect()
}

#[cfg(target_arch = "x86_64")]
fn detect() -> CpuBf16Units {
    use std::arch::x86_64::{__cpuid, __cpuid_count};

    // CPUID exists on every x86_64 CPU (safe since Rust 1.87); leaf 7 is read only where
    // leaf 0 says it exists.
    let max_leaf = __cpuid(0).eax;
    if max_leaf < 7 {
        return CpuBf16Units::default();
    }
    let leaf1 = __cpuid(1);
    let os_xsave = leaf1.ecx & (1 << 27) != 0;
    if !os_xsave {
        return CpuBf16Units::default();
    }
    // SAFETY: OSXSAVE (CPUID.1:ECX.27) set means XGETBV is enabled.
    let xcr0 = unsafe { xcr0() };
    let leaf7 = __cpuid_count(7, 0);
    let amx_tile = leaf7.edx & (1 << 24) != 0;
    let amx_bf16 = leaf7.edx & (1 << 22) != 0;
    let os_amx = xcr0 & (0b11 << 17) == 0b11 << 17; // XTILECFG, XTILEDATA
    CpuBf16Units {
        amx_bf16: amx_tile && amx_bf16 && os_amx,
        // The standard library checks the CPU bits and the OS's AVX-512 state (opmask, ZMM).
        avx512_bf16: std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512f"),
    }
}

/// XCR0: which register states the OS saves (the intrinsic needs the `xsave` target feature).
///
/// # Safety
/// XGETBV must be enabled (CPUID.1:ECX.OSXSAVE).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "xsave")]
unsafe fn xcr0() -> u64 {
    // SAFETY: the caller checked OSXSAVE.
    unsafe { std::arch::x86_64::_xgetbv(0) }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> CpuBf16Units {
    CpuBf16Units::default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_named_in_refusals() {
        let none = CpuBf16Units::default();
        assert!(!none.any());
        assert_eq!(none.to_string(), "neither AMX-BF16 nor AVX512-BF16");
        let both = CpuBf16Units {
            amx_bf16: true,
            avx512_bf16: true,
        };
        assert!(both.any());
        assert_eq!(both.to_string(), "AMX-BF16 and AVX512-BF16");
    }

    /// The detection agrees with the kernel's own view of the CPU where Linux gives one.
    #[test]
    fn detection_agrees_with_proc_cpuinfo() {
        let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
            println!("SKIPPED: no /proc/cpuinfo");
            return;
        };
        let Some(flags) = info.lines().find(|l| l.starts_with("flags")) else {
            println!("SKIPPED: /proc/cpuinfo lists no flags");
            return;
        };
        let has = |f: &str| flags.split_whitespace().any(|x| x == f);
        let units = cpu_bf16_units();
        // The kernel lists a flag only where the CPU has it; the OS-state checks can only
        // take a unit away, never add one.
        assert!(!units.amx_bf16 || has("amx_bf16"), "{units} vs cpuinfo");
        assert!(
            !units.avx512_bf16 || has("avx512_bf16"),
            "{units} vs cpuinfo"
        );
        if has("avx512_bf16") && has("avx512f") {
            assert!(
                units.avx512_bf16,
                "cpuinfo lists avx512_bf16, detection missed it"
            );
        }
    }
}
