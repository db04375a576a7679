//! Weights on 2 MiB pages. A decoding step streams every weight from memory once, and through
//! 4 KiB pages it misses the TLB every 4 KiB (each miss a page walk, a two-level one in a VM)
//! while the hardware prefetchers stop at every page edge. Where Linux leaves transparent huge
//! pages to `madvise` (the default of many distributions) nothing is on huge pages unless
//! asked. Advice only: where the kernel has no THP, or refuses, nothing changes.

use candle_core::{CpuStorage, Storage, Tensor};

/// Linux's huge page.
#[cfg(target_os = "linux")]
const HUGE: usize = 2 << 20;

/// Asks for 2 MiB pages under the whole 2 MiB pages inside `buf`, before its first write (the
/// page faults then map huge pages): for large fresh allocations, which are untouched mmap
/// memory.
pub(crate) fn advise(buf: &mut [u8]) {
    #[cfg(target_os = "linux")]
    {
        let start = buf.as_mut_ptr() as usize;
        let (first, end) = (
            start.next_multiple_of(HUGE),
            (start + buf.len()) / HUGE * HUGE,
        );
        if end > first {
            // SAFETY: the range lies inside `buf`, and the advice changes no contents.
            unsafe {
                libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// Moves the 2 MiB pages that `buf` touches onto huge pages now (`MADV_COLLAPSE`, Linux 6.1),
/// for weights already written into the heap: a SmolLM2 layer's tensors are 0.1–0.6 MiB each,
/// too small to hold a whole huge page of their own, but loaded one after another they fill
/// the heap's pages. Neighbouring allocations in those pages move too, unchanged. Failures
/// (an older kernel, a page beyond the mapping, no free huge page) leave the pages as they are.
pub(crate) fn collapse(buf: &[u8]) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let start = buf.as_ptr() as usize / HUGE * HUGE;
        let end = (buf.as_ptr() as usize + buf.len()).next_multiple_of(HUGE);
        for page in (start..end).step_by(HUGE) {
            // SAFETY: collapsing changes where pages live, never their contents; a range that
            // is not (wholly) mapped is refused with an error, which is ignored.
            unsafe {
                libc::madvise(page as *mut libc::c_void, HUGE, libc::MADV_COLLAPSE);
            }
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = buf;
}

/// [`collapse`] of a tensor's host memory (nothing for a tensor on another device).
pub(crate) fn collapse_tensor(t: &Tensor) {
    let (storage, _) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return;
    };
    let (start, bytes) = match cpu {
        CpuStorage::U8(v) => (v.as_ptr().cast::<u8>(), std::mem::size_of_val(v.as_slice())),
        CpuStorage::U32(v) => (v.as_ptr().cast(), std::mem::size_of_val(v.as_slice())),
        CpuStorage::I64(v) => (v.as_ptr().cast(), std::mem::size_of_val(v.as_slice())),
        CpuStorage::BF16(v) => (v.as_ptr().cast(), std::mem::size_of_val(v.as_slice())),
        CpuStorage::F16(v) => (v.as_ptr().cast(), std::mem::size_of_val(v.as_slice())),
        CpuStorage::F32(v) => (v.as_ptr().cast(), std::mem::size_of_val(v.as_slice())),
        CpuStorage::F64(v) => (v.as_ptr().cast(), std::mem::size_of_val(v.as_slice())),
        _ => return,
    };
    // SAFETY: the storage's initialised elements, viewed as the bytes they are made of.
    collapse(unsafe { std::slice::from_raw_parts(start, bytes) });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_and_collapse_keep_the_contents() {
        let mut big: Vec<u8> = vec![0; 5 << 20];
        advise(&mut big);
        big.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i % 251) as u8);
        let small: Vec<u8> = (0..300_000).map(|i| (i % 241) as u8).collect();
        collapse(&small);
        collapse(&big);
        assert!(big.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        assert!(small.iter().enumerate().all(|(i, &b)| b == (i % 241) as u8));
    }
}
