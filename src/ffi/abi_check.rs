//! The ABI test: include/pagenc.h, as a C compiler reads it (through bindgen, see build.rs),
//! against the Rust definitions it was generated from. cbindgen writes the header, but nothing
//! else stops a stale header, a cbindgen quirk or a hand edit from giving C a different layout
//! or value than the library uses.

#[cfg(not(pagenc_header))]
#[test]
fn header_exists() {
    panic!("include/pagenc.h is missing: run `cbindgen -o include/pagenc.h .` and commit it");
}

#[cfg(pagenc_header)]
mod checks {
    use std::mem::{align_of, offset_of, size_of};

    use crate::ffi::*;

    #[allow(
        non_camel_case_types,
        non_upper_case_globals,
        non_snake_case,
        dead_code,
        clippy::all
    )]
    mod h {
        include!(concat!(env!("OUT_DIR"), "/pagenc_h.rs"));
    }

    /// Size, alignment and the offset of every listed field of a Rust type and its C twin.
    macro_rules! same_layout {
        ($rust:ty, $c:ty, [$($field:ident),*]) => {{
            assert_eq!(size_of::<$rust>(), size_of::<$c>(), "size of {}", stringify!($rust));
            assert_eq!(align_of::<$rust>(), align_of::<$c>(), "align of {}", stringify!($rust));
            $(
                assert_eq!(
                    offset_of!($rust, $field),
                    offset_of!($c, $field),
                    "offset of {}.{}",
                    stringify!($rust),
                    stringify!($field)
                );
            )*
        }};
    }

    #[test]
    fn struct_layouts_match() {
        same_layout!(pagenc_run, h::pagenc_run, [gpa, npages, encrypted]);
        same_layout!(pagenc_ram_range, h::pagenc_ram_range, [gpa, size]);
        same_layout!(
            pagenc_stats,
            h::pagenc_stats,
            [
                hypercalls,
                rejected,
                clipped_pages,
                pages_flipped,
                shared_ranges,
                shared_pages,
                heap_bytes,
                msr_value,
                msr_writes,
                ram_pages
            ]
        );
        // Every field is listed: the fields' sizes add up to the struct's (no field forgotten
        // above, none added in C).
        assert_eq!(
            size_of::<h::pagenc_stats>(),
            (9 + PAGENC_REJECT_REASONS) * 8
        );
        assert_eq!(size_of::<pagenc_result>(), size_of::<h::pagenc_result>());
        assert_eq!(
            size_of::<pagenc_reject_reason>(),
            size_of::<h::pagenc_reject_reason>()
        );
    }

    /// The header's value of each Rust variant. Exhaustive: a new variant fails to compile
    /// until it is listed here.
    fn result_in_header(r: pagenc_result) -> h::pagenc_result {
        match r {
            pagenc_result::Ok => h::PAGENC_RESULT_OK,
            pagenc_result::NullArgument => h::PAGENC_RESULT_NULL_ARGUMENT,
            pagenc_result::InvalidLayout => h::PAGENC_RESULT_INVALID_LAYOUT,
            pagenc_result::GuestRejected => h::PAGENC_RESULT_GUEST_REJECTED,
            pagenc_result::UnhandledExit => h::PAGENC_RESULT_UNHANDLED_EXIT,
            pagenc_result::BadStream => h::PAGENC_RESULT_BAD_STREAM,
            pagenc_result::BufferTooSmall => h::PAGENC_RESULT_BUFFER_TOO_SMALL,
            pagenc_result::Reentrant => h::PAGENC_RESULT_REENTRANT,
            pagenc_result::KvmError => h::PAGENC_RESULT_KVM_ERROR,
            pagenc_result::Internal => h::PAGENC_RESULT_INTERNAL,
            pagenc_result::InvalidArgument => h::PAGENC_RESULT_INVALID_ARGUMENT,
            pagenc_result::WriteFailed => h::PAGENC_RESULT_WRITE_FAILED,
            pagenc_result::Unsupported => h::PAGENC_RESULT_UNSUPPORTED,
        }
    }

    fn reject_in_header(r: pagenc_reject_reason) -> h::pagenc_reject_reason {
        match r {
            pagenc_reject_reason::UnknownHypercall => h::PAGENC_REJECT_REASON_UNKNOWN_HYPERCALL,
            pagenc_reject_reason::Unaligned => h::PAGENC_REJECT_REASON_UNALIGNED,
            pagenc_reject_reason::ZeroLength => h::PAGENC_REJECT_REASON_ZERO_LENGTH,
            pagenc_reject_reason::OutOfRange => h::PAGENC_REJECT_REASON_OUT_OF_RANGE,
            pagenc_reject_reason::ReservedAttrs => h::PAGENC_REJECT_REASON_RESERVED_ATTRS,
            pagenc_reject_reason::BadPageSizeHint => h::PAGENC_REJECT_REASON_BAD_PAGE_SIZE_HINT,
            pagenc_reject_reason::ReservedMsrBits => h::PAGENC_REJECT_REASON_RESERVED_MSR_BITS,
        }
    }

    #[test]
    fn enum_values_match() {
        for r in pagenc_result::ALL {
            assert_eq!(r as u32, result_in_header(r), "{r:?}");
        }
        for r in crate::hypercall::RejectReason::ALL {
            let c = pagenc_reject_reason::from(r);
            // The C value indexes pagenc_stats.rejected, which the core fills by its own value.
            assert_eq!(c as u32, reject_in_header(c), "{c:?}");
            assert_eq!(c as usize, r as usize, "{r:?}");
        }
    }

    #[test]
    fn constants_match() {
        assert_eq!(
            u64::from(h::PAGENC_ITER_SHARED_ONLY),
            u64::from(PAGENC_ITER_SHARED_ONLY)
        );
        assert_eq!(h::PAGENC_GPA_LIMIT, PAGENC_GPA_LIMIT);
        assert_eq!(h::PAGENC_REJECT_REASONS as usize, PAGENC_REJECT_REASONS);
        assert_eq!(PAGENC_REJECT_REASONS, crate::hypercall::RejectReason::COUNT);
    }

    #[test]
    fn version_defines_match_cargo_toml() {
        let v = |s: &str| s.parse::<u32>().expect("cargo's version parts are numbers");
        assert_eq!(h::PAGENC_VERSION_MAJOR, v(env!("CARGO_PKG_VERSION_MAJOR")));
        assert_eq!(h::PAGENC_VERSION_MINOR, v(env!("CARGO_PKG_VERSION_MINOR")));
        assert_eq!(h::PAGENC_VERSION_PATCH, v(env!("CARGO_PKG_VERSION_PATCH")));
    }

    #[test]
    fn callback_types_match() {
        // Assignment between the two types compiles only if they are the same type: the same
        // argument and return types in the same order.
        let change: h::pagenc_change_fn = None;
        let _: pagenc_change_fn = change;
        let readiness: h::pagenc_readiness_fn = None;
        let _: pagenc_readiness_fn = readiness;
        let write: h::pagenc_write_fn = None;
        let _: pagenc_write_fn = write;
    }

    // The encrypted-page transport's part of the header (src/ffi/transport.rs).
    #[test]
    fn transport_layouts_match_the_header() {
        same_layout!(
            pagenc_simfw_config,
            h::pagenc_simfw_config,
            [role, policy, memory_key, platform_id]
        );
        same_layout!(pagenc_memslot, h::pagenc_memslot, [gpa, size, host]);
        same_layout!(
            pagenc_simfw_stats,
            h::pagenc_simfw_stats,
            [
                send_start,
                send_update_data,
                send_finish,
                send_cancel,
                receive_start,
                receive_update_data,
                receive_finish,
                length_queries,
                failures
            ]
        );
        assert_eq!(size_of::<h::pagenc_simfw_stats>(), 9 * 8);
        same_layout!(
            pagenc_transport_send_params,
            h::pagenc_transport_send_params,
            [
                policy,
                mode,
                src_pdh,
                src_pdh_len,
                dst_pdh,
                dst_pdh_len,
                dst_plat_certs,
                dst_plat_certs_len,
                amd_certs,
                amd_certs_len
            ]
        );
        assert_eq!(
            size_of::<pagenc_transport_result>(),
            size_of::<h::pagenc_transport_result>()
        );
    }

    #[test]
    fn transport_values_match_the_header() {
        use pagenc_transport_result as R;
        for r in R::ALL {
            let c = match r {
                R::Ok => h::PAGENC_TRANSPORT_RESULT_OK,
                R::NullArgument => h::PAGENC_TRANSPORT_RESULT_NULL_ARGUMENT,
                R::InvalidArgument => h::PAGENC_TRANSPORT_RESULT_INVALID_ARGUMENT,
                R::Refused => h::PAGENC_TRANSPORT_RESULT_REFUSED,
                R::BadState => h::PAGENC_TRANSPORT_RESULT_BAD_STATE,
                R::BadStream => h::PAGENC_TRANSPORT_RESULT_BAD_STREAM,
                R::FirmwareError => h::PAGENC_TRANSPORT_RESULT_FIRMWARE_ERROR,
                R::KernelError => h::PAGENC_TRANSPORT_RESULT_KERNEL_ERROR,
                R::BufferTooSmall => h::PAGENC_TRANSPORT_RESULT_BUFFER_TOO_SMALL,
                R::Internal => h::PAGENC_TRANSPORT_RESULT_INTERNAL,
            };
            assert_eq!(r as u32, c, "{r:?}");
        }
        assert_eq!(h::PAGENC_SEV_MODE_SEV, PAGENC_SEV_MODE_SEV);
        assert_eq!(h::PAGENC_SEV_MODE_SEV_ES, PAGENC_SEV_MODE_SEV_ES);
        assert_eq!(h::PAGENC_SEV_MODE_SEV_SNP, PAGENC_SEV_MODE_SEV_SNP);
        assert_eq!(h::PAGENC_SIMFW_ROLE_SOURCE, PAGENC_SIMFW_ROLE_SOURCE);
        assert_eq!(
            h::PAGENC_SIMFW_ROLE_DESTINATION,
            PAGENC_SIMFW_ROLE_DESTINATION
        );
        assert_eq!(h::PAGENC_SIMFW_CERT_PDH, PAGENC_SIMFW_CERT_PDH);
        assert_eq!(h::PAGENC_SIMFW_CERT_PLATFORM, PAGENC_SIMFW_CERT_PLATFORM);
        assert_eq!(h::PAGENC_SIMFW_CERT_AMD, PAGENC_SIMFW_CERT_AMD);
        assert_eq!(
            h::PAGENC_TRANSPORT_PACKET_MAX as usize,
            PAGENC_TRANSPORT_PACKET_MAX
        );
        assert_eq!(
            h::PAGENC_TRANSPORT_PACKET_PREFIX as usize,
            PAGENC_TRANSPORT_PACKET_PREFIX
        );
        assert_eq!(
            h::PAGENC_TRANSPORT_SESSION_MAX as usize,
            PAGENC_TRANSPORT_SESSION_MAX
        );
    }
}
