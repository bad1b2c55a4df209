//! The unwind boundary. Every export runs its body inside [`ffi_boundary!`], so a panic (a bug in
//! pagenc, never a reaction to hostile input) becomes a return value instead of unwinding into C,
//! which would abort the VMM or worse.

use std::ffi::{c_char, c_void};

use super::error::pagenc_result;

/// What an export returns when its body panicked, chosen by the export's return type.
pub(crate) trait PanicValue {
    /// The fallback value.
    fn panic_value() -> Self;
}

impl PanicValue for pagenc_result {
    fn panic_value() -> Self {
        pagenc_result::Internal
    }
}

impl PanicValue for bool {
    fn panic_value() -> Self {
        false
    }
}

impl PanicValue for u32 {
    fn panic_value() -> Self {
        0
    }
}

impl PanicValue for usize {
    fn panic_value() -> Self {
        0
    }
}

impl PanicValue for () {
    fn panic_value() -> Self {}
}

impl PanicValue for *const c_char {
    fn panic_value() -> Self {
        std::ptr::null()
    }
}

impl PanicValue for *mut c_void {
    fn panic_value() -> Self {
        std::ptr::null_mut()
    }
}

/// Runs the body of an export under `catch_unwind`; a panic returns the export's
/// [`PanicValue`]: `PAGENC_RESULT_INTERNAL`, `false`, 0 or NULL. `return` inside the body returns
/// from the export (the body is a closure), which is what the `try_*!` macros rely on.
///
/// `AssertUnwindSafe`: after a caught panic the only state that may be half-updated is the
/// tracker's map, which sits behind a mutex that the panic poisons; every later call on that
/// tracker then fails with `PAGENC_RESULT_INTERNAL` instead of reading it.
macro_rules! ffi_boundary {
    ($($body:tt)*) => {
        match ::std::panic::catch_unwind(::std::panic::AssertUnwindSafe(|| { $($body)* })) {
            Ok(ret) => ret,
            Err(_) => $crate::ffi::panic::PanicValue::panic_value(),
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn panics(really: bool) -> pagenc_result {
        ffi_boundary! {
            if really {
                panic!("deliberate test panic");
            }
            pagenc_result::Ok
        }
    }

    fn early_return(x: u32) -> u32 {
        ffi_boundary! {
            if x > 1 {
                return 7;
            }
            x
        }
    }

    #[test]
    fn a_panic_becomes_internal() {
        assert_eq!(panics(false), pagenc_result::Ok);
        assert_eq!(panics(true), pagenc_result::Internal);
    }

    #[test]
    fn return_leaves_the_body_only() {
        assert_eq!(early_return(0), 0);
        assert_eq!(early_return(5), 7);
    }
}
