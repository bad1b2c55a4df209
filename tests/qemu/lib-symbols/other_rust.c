/*
 * Stands in for a second Rust staticlib in the same link (QEMU --enable-rust,
 * built by another rustc): it defines the runtime symbols every Rust staticlib
 * defines. pagenc must neither clash with them nor call them: each aborts, so a
 * pagenc that bound to this allocator instead of its own would fail the run.
 */
#include <stdio.h>
#include <stdlib.h>

static void __attribute__((noreturn)) wrong(const char *what)
{
    fprintf(stderr, "pagenc called the other Rust's %s\n", what);
    abort();
}

void rust_eh_personality(void) { wrong("rust_eh_personality"); }
void *__rust_alloc(size_t size, size_t align) { (void)size; (void)align; wrong("__rust_alloc"); }
void __rust_dealloc(void *p, size_t size, size_t align) { (void)p; (void)size; (void)align; wrong("__rust_dealloc"); }
