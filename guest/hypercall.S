/*
 * Hypercall mode of the payload (option `hc`, see payload.S): the guest's own
 * KVM_HC_MAP_GPA_RANGE calls with VMMCALL, each result checked.
 * Included by payload.S (`.include`); assembled in its .text, 32-bit code.
 *
 * Only ever reached with `hc` on the command line: on a KVM that does not
 * turn VMMCALL into an exit (this machine's PVM /dev/kvm), a 64-bit VMMCALL
 * livelocks the vCPU.
 */

/* One checked call: mode 0 = 64-bit caller (KVM sets KVM_EXIT_HYPERCALL_LONG_MODE),
 * 1 = 32-bit caller (compatibility mode: KVM truncates arguments and RAX to 32 bits). */
    .macro HCALL mode, nr, a0, a1, a2, exp, label
    .pushsection .rodata
hc_lbl\@: .asciz "\label"
    .popsection
    movl $\mode, hc_mode32
    movl $((\nr) & 0xffffffff), hc_nr
    movl $(((\nr) >> 32) & 0xffffffff), hc_nr + 4
    movl $((\a0) & 0xffffffff), hc_a0
    movl $(((\a0) >> 32) & 0xffffffff), hc_a0 + 4
    movl $((\a1) & 0xffffffff), hc_a1
    movl $(((\a1) >> 32) & 0xffffffff), hc_a1 + 4
    movl $((\a2) & 0xffffffff), hc_a2
    movl $(((\a2) >> 32) & 0xffffffff), hc_a2 + 4
    movl $((\exp) & 0xffffffff), hc_exp
    movl $(((\exp) >> 32) & 0xffffffff), hc_exp + 4
    movl $hc_lbl\@, hc_label
    call hc_do
    .endm

/* ---------------------------------------------------------------------- */
/* Long mode (the 32-bit code goes on in compatibility mode), 64-bit IDT,
 * tally and model cleared. Halts with a message if RAM < 128 MiB. */
hc_setup:
    pushal
    movl mbi_ptr, %ebp
    testl %ebp, %ebp
    jz 9f
    testl $MB_INFO_MEM, (%ebp)
    jz 9f
    movl 8(%ebp), %eax            /* mem_upper: KiB above 1 MiB */
    shll $10, %eax
    addl $1 << 20, %eax
    andl $~(PAGE - 1), %eax
    movl %eax, hc_ram_end
    cmpl $HC_MIN_RAM, %eax
    jae 1f
9:
    movl $msg_hc_ram, %esi
    call puts
    jmp fatal_handler
1:
    /* Tally (0x7004..0x701f), model, page tables. */
    movl $T_CHECKS, %edi
    movl $11, %ecx
    xorl %eax, %eax
    rep stosl
    movl $model, T_MODEL
    movl $MODEL_PAGES, T_MODEL_PAGES
    movl $model, %edi
    movl $MODEL_PAGES / 32, %ecx
    rep stosl
    movl $0x2545f491, hc_rng      /* fixed seed: a reset replays the same churn */
    movl $pt_pml4, %edi
    movl $6 * 4096 / 4, %ecx
    rep stosl
    movl $pt_pdpt + 3, pt_pml4
    xorl %ecx, %ecx
2:
    movl %ecx, %eax
    shll $12, %eax
    addl $pt_pd + 3, %eax
    movl %eax, pt_pdpt(,%ecx,8)
    incl %ecx
    cmpl $4, %ecx
    jb 2b
    xorl %ecx, %ecx
3:
    movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax               /* present, writable, 2 MiB page */
    movl %eax, pt_pd(,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jb 3b

    /* 64-bit interrupt gates: #GP to gp64, the rest to fatal64's stubs. */
    movl $idt64, %edi
    xorl %ecx, %ecx
4:
    leal fatal64_stubs(,%ecx,8), %eax
    cmpl $13, %ecx
    jne 5f
    movl $gp64, %eax
5:
    movw %ax, (%edi)
    movw $SEL_CODE64, 2(%edi)
    movw $0x8e00, 4(%edi)
    shrl $16, %eax
    movw %ax, 6(%edi)
    movl $0, 8(%edi)
    movl $0, 12(%edi)
    addl $16, %edi
    incl %ecx
    cmpl $32, %ecx
    jb 4b

    movl %cr4, %eax
    orl $0x20, %eax               /* PAE */
    movl %eax, %cr4
    movl $pt_pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx        /* EFER */
    rdmsr
    orl $0x100, %eax              /* LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000000, %eax         /* PG: long mode active, compatibility mode */
    movl %eax, %cr0
    lidt idt64_desc
    movl $msg_hc_mode, %esi
    call puts
    popal
    ret

/* ---------------------------------------------------------------------- */
/* The boot sequence of a Linux SEV guest (see payload.S), then stage 1. */
hc_boot_sequence:
    pushal
    /* E820 re-encryption: every RAM entry, encrypted, 4K hint. The first
     * check is the one `hcwrong` expects wrongly. */
    HCALL 0, KVM_HC_MAP_GPA_RANGE, 0, 0xa0, ENC, 0, "e820 re-encrypt [0, 640K)"
    movl hc_ram_end, %edx
    subl $1 << 20, %edx
    shrl $12, %edx                /* pages from 1 MiB to the end of RAM */
    movl $0x100000, %eax
    movl $1, %ecx
    movl $ENC, %ebx
    movl $lbl_e820, %esi
    call hc_range

    HCALL 0, KVM_HC_MAP_GPA_RANGE, BSS_DEC, 512, 0, 0, ".bss..decrypted"

    /* 32-bit callers (compatibility mode): RAX comes back truncated. */
    HCALL 1, KVM_HC_MAP_GPA_RANGE, 0x05400000, 32, 0, 0, "32-bit: decrypt 32 pages"
    HCALL 1, KVM_HC_MAP_GPA_RANGE, 0x05400000, 1, 0x20, 0xffffffea, "32-bit: reserved attrs (pagenc)"
    HCALL 1, 0x7777, 0, 0, 0, 0xfffffc18, "32-bit: unknown nr (KVM, no exit)"

    call hc_msr_checks

    /* Per-CPU decrypted variables: apf_reason, steal_time, apic_eoi of 4 CPUs. */
    movl $0x07000000 + 0x1000, %eax
    movl $4, %ecx
6:
    pushl %ecx
    movl $3, %ecx
    movl $1, %edx
    xorl %ebx, %ebx
    movl $lbl_percpu, %esi
    call hc_range
    popl %ecx
    addl $0x40000 - 0x3000, %eax
    loop 6b

    /* swiotlb: ascending, 4K hint: 4 one-page calls, 8 x 2 MiB, 4 one-page. */
    movl $0x04000000 - 4 * PAGE, %eax
    movl $4, %ecx
    movl $1, %edx
    xorl %ebx, %ebx
    movl $lbl_swiotlb, %esi
    call hc_range
    movl $8, %ecx
    movl $512, %edx
    call hc_range
    movl $4, %ecx
    movl $1, %edx
    call hc_range

    /* Hostile calls. pagenc refuses these (they exit to QEMU): */
    HCALL 0, KVM_HC_MAP_GPA_RANGE, 0x200000, 1, 0x20, EINVAL, "reserved attribute bit 5 (pagenc)"
    HCALL 0, KVM_HC_MAP_GPA_RANGE, 0x200000, 1, 0x8000000000000000, EINVAL, "reserved attribute bit 63 (pagenc)"
    HCALL 0, KVM_HC_MAP_GPA_RANGE, 0x200000, 1, 3, EINVAL, "page-size hint 3 (pagenc)"
    HCALL 0, KVM_HC_MAP_GPA_RANGE, (1<<52), 1, 0, EINVAL, "gpa beyond 52 bits (pagenc)"
    HCALL 0, KVM_HC_MAP_GPA_RANGE, ((1<<52)-PAGE), 2, 0, EINVAL, "range crossing 52 bits (pagenc)"
    /* accepted, but not RAM: clipped (4 pages) */
    HCALL 0, KVM_HC_MAP_GPA_RANGE, 0x100000000, 4, 0, 0, "above RAM, clipped (pagenc)"
    /* KVM answers these itself, before any exit (pagenc never sees them): */
    HCALL 0, KVM_HC_MAP_GPA_RANGE, 0x200010, 1, 0, EINVAL, "misaligned gpa (KVM, no exit)"
    HCALL 0, KVM_HC_MAP_GPA_RANGE, 0x200000, 0, 0, EINVAL, "npages 0 (KVM, no exit)"
    HCALL 0, KVM_HC_MAP_GPA_RANGE, 0xfffffffffffff000, 0xfff0000000000001, 0, EINVAL, "gfn + npages wraps 64 bits (KVM, no exit)"
    /* (gfn + npages past 52 bits without wrapping 64 bits does exit: pagenc's out-of-range) */
    HCALL 0, KVM_HC_MAP_GPA_RANGE, 0xfffffffffffff000, 2, 0, EINVAL, "gpa at the top of 64 bits (pagenc)"
    HCALL 0, 0x7777, 0, 0, 0, ENOSYS, "unknown nr (KVM, no exit)"

    /* free_initmem: the unused tail of .bss..decrypted re-encrypted. */
    movl $BSS_DEC + BSS_DEC_USED, %eax
    movl $(0x200000 - BSS_DEC_USED) / PAGE, %ecx
    movl $1, %edx
    movl $ENC, %ebx
    movl $lbl_bss_tail, %esi
    call hc_range

    movl $1, T_STAGE
    movl $msg_hc_booted, %esi
    call puts
    call hc_print_tally
    movl $msg_nl, %esi
    call puts
    popal
    ret

/* eax = first gpa, ecx = calls, edx = pages per call, ebx = attrs, esi = label:
 * ascending 64-bit calls, each expected to return 0. Returns eax = next gpa. */
hc_range:
    pushl %ecx
1:
    movl $0, hc_mode32
    movl $KVM_HC_MAP_GPA_RANGE, hc_nr
    movl $0, hc_nr + 4
    movl %eax, hc_a0
    movl $0, hc_a0 + 4
    movl %edx, hc_a1
    movl $0, hc_a1 + 4
    movl %ebx, hc_a2
    movl $0, hc_a2 + 4
    movl $0, hc_exp
    movl $0, hc_exp + 4
    movl %esi, hc_label
    call hc_do
    pushl %edx
    shll $12, %edx
    addl %edx, %eax
    popl %edx
    loop 1b
    popl %ecx
    ret

/* READY through WRMSR, read back; a reserved bit must #GP and change nothing. */
hc_msr_checks:
    pushal
    movl $1, %eax
    call hc_wrmsr
    xorl %ebx, %ebx
    movl $lbl_wrmsr_ready, %esi
    call hc_check_val
    call hc_rdmsr
    movl $1, %ebx
    movl $lbl_rdmsr_ready, %esi
    call hc_check_val
    movl $2, %eax
    call hc_wrmsr
    movl $1, %ebx
    movl $lbl_wrmsr_reserved, %esi
    call hc_check_val
    call hc_rdmsr
    movl $1, %ebx
    movl $lbl_rdmsr_after, %esi
    call hc_check_val
    popal
    ret

/* eax = value for MSR_KVM_MIGRATION_CONTROL. Returns eax = 1 if it #GP'd. */
hc_wrmsr:
    pushl %ecx
    pushl %edx
    movl $0, msr_faulted
    movl $1, msr_armed
    movl $MSR_KVM_MIGRATION_CONTROL, %ecx
    xorl %edx, %edx
    wrmsr
    movl $0, msr_armed
    movl msr_faulted, %eax
    popl %edx
    popl %ecx
    ret

/* Returns eax = MSR_KVM_MIGRATION_CONTROL (low half), or 0xdead0000 if it #GP'd. */
hc_rdmsr:
    pushl %ecx
    pushl %edx
    movl $0, msr_faulted
    movl $1, msr_armed
    movl $MSR_KVM_MIGRATION_CONTROL, %ecx
    xorl %eax, %eax
    rdmsr
    movl $0, msr_armed
    cmpl $0, msr_faulted
    je 1f
    movl $0xdead0000, %eax
1:
    popl %edx
    popl %ecx
    ret

/* eax = value got, ebx = value expected, esi = label: one check. */
hc_check_val:
    pushal
    movl %eax, hc_ret
    movl $0, hc_ret + 4
    movl %ebx, hc_exp
    movl $0, hc_exp + 4
    movl %esi, hc_label
    call hc_check
    popal
    ret

/* ---------------------------------------------------------------------- */
/* The call in hc_nr..hc_a2 (mode hc_mode32), checked against hc_exp. An
 * accepted call that was expected to succeed updates the model. */
hc_do:
    pushal
    movl hc_a0, %eax
    movl %eax, T_IF_GPA
    movl hc_a1, %eax
    movl %eax, T_IF_NPAGES
    movl hc_a2, %eax
    movl %eax, T_IF_ATTRS
    movl $1, T_INFLIGHT
    incl T_VMMCALLS
    cmpl $0, hc_mode32
    jne 1f
    lcall $SEL_CODE64, $hc64_stub
    jmp 2f
1:
    movl hc_nr, %eax
    movl hc_a0, %ebx
    movl hc_a1, %ecx
    movl hc_a2, %edx
    xorl %esi, %esi
    vmmcall
    movl %eax, hc_ret
    movl $0, hc_ret + 4
2:
    call hc_check
    testl %eax, %eax
    jz 9f
    movl hc_exp, %eax
    orl hc_exp + 4, %eax
    jnz 9f
    cmpl $KVM_HC_MAP_GPA_RANGE, hc_nr
    jne 9f
    cmpl $0, hc_a0 + 4            /* above 4 GiB: not RAM here, not modelled */
    jne 9f
    cmpl $0, hc_a1 + 4
    jne 9f
    movl hc_a0, %ebx
    shrl $12, %ebx
    movl hc_a1, %ecx
3:
    testl %ecx, %ecx
    jz 9f
    cmpl $MODEL_PAGES, %ebx
    jae 9f
    testl $ENC, hc_a2
    jz 4f
    btrl %ebx, model
    jmp 5f
4:
    btsl %ebx, model
5:
    incl %ebx
    decl %ecx
    jmp 3b
9:
    movl $0, T_INFLIGHT
    popal
    ret

/* hc_ret against hc_exp (label hc_label). Returns eax = 1 if equal; else
 * counts and prints a MISMATCH line and returns 0. With `hcwrong` the very
 * first check expects the wrong value (negative control). */
hc_check:
    pushl %ebx
    pushl %edx
    pushl %esi
    incl T_CHECKS
    movl hc_exp, %ebx
    movl hc_exp + 4, %edx
    cmpl $0, opt_hcwrong
    je 1f
    cmpl $1, T_CHECKS
    jne 1f
    xorl $1, %ebx
1:
    cmpl hc_ret, %ebx
    jne 2f
    cmpl hc_ret + 4, %edx
    jne 2f
    movl $1, %eax
    jmp 9f
2:
    incl T_BAD
    movl $msg_mismatch, %esi
    call puts
    movl T_CHECKS, %eax
    call puthex
    movl $msg_sp, %esi
    call puts
    movl hc_label, %esi
    call puts
    movl $msg_got, %esi
    call puts
    movl hc_ret + 4, %eax
    call puthex
    movl hc_ret, %eax
    call puthex
    movl $msg_expected, %esi
    call puts
    movl %edx, %eax
    call puthex
    movl %ebx, %eax
    call puthex
    movl $msg_nl, %esi
    call puts
    xorl %eax, %eax
9:
    popl %esi
    popl %edx
    popl %ebx
    ret

/* " hc checks N mismatches N vmmcalls N conversions N" (no newline). */
hc_print_tally:
    pushal
    movl $msg_t_checks, %esi
    call puts
    movl T_CHECKS, %eax
    call puthex
    movl $msg_t_bad, %esi
    call puts
    movl T_BAD, %eax
    call puthex
    movl $msg_t_calls, %esi
    call puts
    movl T_VMMCALLS, %eax
    call puthex
    movl $msg_t_conv, %esi
    call puts
    movl T_CONV, %eax
    call puthex
    popal
    ret

/* One conversion in the churn region (called every 64 pages dirtied): flip
 * 1-4 pages the way the model says they are not; every 8th from 32-bit code;
 * every 256th conversion is followed by a hostile call. */
hc_churn:
    pushal
    movl hc_rng, %eax             /* xorshift32 */
    movl %eax, %edx
    shll $13, %edx
    xorl %edx, %eax
    movl %eax, %edx
    shrl $17, %edx
    xorl %edx, %eax
    movl %eax, %edx
    shll $5, %edx
    xorl %edx, %eax
    movl %eax, hc_rng

    movl %eax, %ebx
    andl $CHURN_PAGES - 1, %ebx   /* first page */
    movl %eax, %ecx
    shrl $11, %ecx
    andl $3, %ecx
    incl %ecx                     /* 1..4 pages */
    movl $CHURN_PAGES, %edx
    subl %ebx, %edx
    cmpl %edx, %ecx
    jbe 1f
    movl %edx, %ecx
1:
    addl $CHURN_BASE >> 12, %ebx
    xorl %edx, %edx               /* attrs: decrypt, unless the page is shared */
    btl %ebx, model
    jnc 2f
    movl $ENC, %edx
2:
    incl T_CONV
    movl T_CONV, %eax
    andl $7, %eax
    cmpl $7, %eax
    sete %al
    movzbl %al, %eax
    movl %eax, hc_mode32
    movl $KVM_HC_MAP_GPA_RANGE, hc_nr
    movl $0, hc_nr + 4
    shll $12, %ebx
    movl %ebx, hc_a0
    movl $0, hc_a0 + 4
    movl %ecx, hc_a1
    movl $0, hc_a1 + 4
    movl %edx, hc_a2
    movl $0, hc_a2 + 4
    movl $0, hc_exp
    movl $0, hc_exp + 4
    movl $lbl_churn, hc_label
    call hc_do

    testl $255, T_CONV
    jnz 9f
    HCALL 0, KVM_HC_MAP_GPA_RANGE, CHURN_BASE, 1, 0x40, EINVAL, "churn: reserved attribute bit 6 (pagenc)"
9:
    popal
    ret

/* ---------------------------------------------------------------------- */
/* 64-bit code: the VMMCALL of a 64-bit caller, and the exception handlers.
 * Addresses are loaded with `movl $sym` (the object is 32-bit ELF). */
    .code64
/* Reached by `lcall $SEL_CODE64` from compatibility mode: makes the call in
 * hc_nr/hc_a0..a2 with 64-bit registers, stores RAX in hc_ret, returns with a
 * 32-bit far return (0xcb: EIP and CS as the 32-bit lcall pushed them). */
hc64_stub:
    movl %esp, %esp               /* RSP = the 32-bit stack, upper half clear */
    movl $hc_nr, %edi
    movq (%rdi), %rax
    movq 8(%rdi), %rbx
    movq 16(%rdi), %rcx
    movq 24(%rdi), %rdx
    xorl %esi, %esi
    vmmcall
    movl $hc_ret, %edi
    movq %rax, (%rdi)
    .byte 0xcb

/* #GP: skip an armed WRMSR/RDMSR (2 bytes), as gp_handler does in 32-bit mode. */
gp64:
    pushq %rdi
    movl $msr_armed, %edi
    cmpl $0, (%rdi)
    je 1f
    movl $0, (%rdi)
    movl $msr_faulted, %edi
    movl $1, (%rdi)
    popq %rdi
    addq $2, 8(%rsp)              /* RIP, above the error code */
    addq $8, %rsp                 /* error code */
    iretq
1:
    popq %rdi
    pushq $13
    jmp fatal64

    .align 8
fatal64_stubs:                    /* 8 bytes each: pushq $vector; jmp fatal64 */
    .set vec, 0
    .rept 32
    .byte 0x6a, vec
    .byte 0xe9
    .long fatal64 - (. + 4)
    .byte 0x90
    .set vec, vec + 1
    .endr

/* Stack: vector, then the CPU's frame (error code or RIP first). Prints the
 * vector and the next two quadwords, and halts. */
fatal64:
    movl $msg_exc64, %esi
    call puts64
    movq (%rsp), %rax
    call puthex64
    movl $msg_exc64_frame, %esi
    call puts64
    movq 8(%rsp), %rax
    call puthex64
    movl $msg_sp, %esi
    call puts64
    movq 16(%rsp), %rax
    call puthex64
    movl $msg_nl, %esi
    call puts64
1:
    cli
    hlt
    jmp 1b

puts64:
    pushq %rax
1:
    lodsb
    testb %al, %al
    jz 2f
    outb %al, $DEBUGCON
    jmp 1b
2:
    popq %rax
    ret

puthex64:
    pushq %rbx
    pushq %rcx
    pushq %rdx
    movq %rax, %rdx
    movl $hexdigits, %ebx
    movl $16, %ecx
1:
    rolq $4, %rdx
    movl %edx, %eax
    andl $0xf, %eax
    movb (%rbx,%rax), %al
    outb %al, $DEBUGCON
    loop 1b
    popq %rdx
    popq %rcx
    popq %rbx
    ret
    .code32

    .pushsection .rodata
msg_hc_ram:      .asciz "pagenc-guest: hypercall mode needs 128 MiB of RAM (-m 128)\n"
msg_hc_mode:     .asciz "pagenc-guest: hypercall mode: long mode on, VMMCALLs follow\n"
msg_hc_booted:   .asciz "pagenc-guest: hc boot sequence done:"
msg_mismatch:    .asciz "pagenc-guest: MISMATCH check "
msg_got:         .asciz ": got "
msg_expected:    .asciz " expected "
msg_sp:          .asciz " "
msg_t_checks:    .asciz " hc checks "
msg_t_bad:       .asciz " mismatches "
msg_t_calls:     .asciz " vmmcalls "
msg_t_conv:      .asciz " conversions "
msg_exc64:       .asciz "\npagenc-guest: unexpected exception in hypercall mode, vector "
msg_exc64_frame: .asciz " frame "
lbl_e820:        .asciz "e820 re-encrypt [1M, end)"
lbl_percpu:      .asciz "per-cpu page"
lbl_swiotlb:     .asciz "swiotlb (ascending, 4K hint)"
lbl_bss_tail:    .asciz ".bss..decrypted tail re-encrypt"
lbl_churn:       .asciz "churn"
lbl_wrmsr_ready: .asciz "wrmsr READY faulted"
lbl_rdmsr_ready: .asciz "rdmsr after READY"
lbl_wrmsr_reserved: .asciz "wrmsr reserved bit 1 faulted"
lbl_rdmsr_after: .asciz "rdmsr after the refused write"
    .popsection

    .pushsection .data
    .align 8
hc_nr:      .quad 0               /* hc_nr..hc_a2: read by hc64_stub in this order */
hc_a0:      .quad 0
hc_a1:      .quad 0
hc_a2:      .quad 0
hc_exp:     .quad 0
hc_ret:     .quad 0
hc_mode32:  .long 0
hc_label:   .long 0
hc_rng:     .long 0
hc_ram_end: .long 0
    .popsection
