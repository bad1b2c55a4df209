//! The C ABI (`include/pagenc.h`, generated from this module by cbindgen): a thin layer over
//! [`crate::tracker`], [`crate::kvm`] and [`crate::stream`].
//!
//! UNSAFETY: this module implements `extern "C"` functions that take raw pointers from C, so it
//! needs `unsafe`; every block states the caller's promise it relies on.
//!
//! Conventions, shared by every export (and stated in the header's documentation):
//! - The handle comes first, then inputs, then outputs; a buffer is followed by its length.
//! - Outputs are written only on success, except where a function says otherwise
//!   (`hc_ret` of the hypercall functions, which the guest must always get).
//! - Every `_new` has a `_free` that accepts NULL. A NULL required pointer gives
//!   `PAGENC_RESULT_NULL_ARGUMENT` (or false / 0 for functions that do not return a result).
//! - No global state: a failure's message is kept by the tracker (`pagenc_last_error`).
//! - No panic crosses the boundary ([`panic`]): a bug gives `PAGENC_RESULT_INTERNAL` / false /
//!   0 / NULL.
//! - Threads: a tracker may be used from any number of threads at once; an iterator or a cursor
//!   from one thread at a time.

#![deny(unsafe_op_in_unsafe_fn)]
// The C names (`pagenc_tracker`, `pagenc_result`, ...) are the ABI.
#![allow(non_camel_case_types)]

#[macro_use]
mod panic;
#[macro_use]
mod handle;
mod error;
mod iter;
mod kvm;
mod stream;
mod tracker;
mod transport;

#[cfg(test)]
mod abi_check;

pub use error::{pagenc_last_error, pagenc_result, pagenc_result_str};
pub use handle::{pagenc_cursor, pagenc_iter, pagenc_tracker};
pub use iter::{
    pagenc_cursor_free, pagenc_cursor_is_encrypted, pagenc_cursor_new, pagenc_cursor_query,
    pagenc_iter_free, pagenc_iter_new, pagenc_iter_next, pagenc_iter_result, pagenc_run,
    PAGENC_GPA_LIMIT, PAGENC_ITER_SHARED_ONLY,
};
pub use kvm::{pagenc_kvm_cpuid_features, pagenc_kvm_enable_exit_hypercall};
pub use stream::{
    pagenc_load, pagenc_load_detailed, pagenc_save, pagenc_save_to, pagenc_stream_problem,
    pagenc_write_fn,
};
pub use tracker::{
    pagenc_change_fn, pagenc_handle_exit, pagenc_hypercall, pagenc_is_encrypted, pagenc_is_ready,
    pagenc_layout_check, pagenc_map_gpa_range, pagenc_msr_read, pagenc_msr_write, pagenc_ram_range,
    pagenc_readiness_fn, pagenc_reject_reason, pagenc_stats, pagenc_tracker_free,
    pagenc_tracker_new, pagenc_tracker_reset, pagenc_tracker_set_change_callback,
    pagenc_tracker_set_layout, pagenc_tracker_set_readiness_callback, pagenc_tracker_stats,
    PAGENC_REJECT_REASONS,
};
pub use transport::{
    pagenc_memslot, pagenc_simfw, pagenc_simfw_cert, pagenc_simfw_config, pagenc_simfw_free,
    pagenc_simfw_get_stats, pagenc_simfw_guest_may_run, pagenc_simfw_guest_state,
    pagenc_simfw_inject_failure, pagenc_simfw_new, pagenc_simfw_set_memslots, pagenc_simfw_stats,
    pagenc_transport, pagenc_transport_free, pagenc_transport_last_error,
    pagenc_transport_last_fw_status, pagenc_transport_new_kvm, pagenc_transport_new_simfw,
    pagenc_transport_packet_len, pagenc_transport_packet_size, pagenc_transport_recv_finish,
    pagenc_transport_recv_page, pagenc_transport_recv_setup, pagenc_transport_result,
    pagenc_transport_result_str, pagenc_transport_send_cancel, pagenc_transport_send_finish,
    pagenc_transport_send_page, pagenc_transport_send_params, pagenc_transport_send_setup,
    pagenc_transport_session_record, PAGENC_SEV_MODE_SEV, PAGENC_SEV_MODE_SEV_ES,
    PAGENC_SEV_MODE_SEV_SNP, PAGENC_SIMFW_CERT_AMD, PAGENC_SIMFW_CERT_PDH,
    PAGENC_SIMFW_CERT_PLATFORM, PAGENC_SIMFW_ROLE_DESTINATION, PAGENC_SIMFW_ROLE_SOURCE,
    PAGENC_TRANSPORT_PACKET_MAX, PAGENC_TRANSPORT_PACKET_PREFIX, PAGENC_TRANSPORT_SESSION_MAX,
};
