//! The migration-stream encoding (placeholder until the stream codec lands).
