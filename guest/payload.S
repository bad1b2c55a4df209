/*
 * pagenc demo/test guest: a multiboot (v1) kernel that keeps dirtying memory.
 *
 * QEMU loads it with `-kernel guest/build/payload.elf -append "<options>"`
 * (SeaBIOS + QEMU's multiboot loader; no disk). It runs in 32-bit protected
 * mode with paging off and:
 *   1. optionally writes MSR_KVM_MIGRATION_CONTROL (0x4b564d08) = 1 (READY),
 *      the write a Linux SEV guest does at boot. Under KVM with -object pagenc
 *      this is a real KVM_EXIT_X86_WRMSR handled by QEMU's MSR filter. Where
 *      the write faults (KVM without the filter) a #GP handler skips it, so the
 *      payload runs anywhere;
 *   2. loops forever writing (pass ^ address) to the first dword of every page
 *      of a region, so migration always has dirty pages to chase;
 *   3. reports on the isa-debugcon port 0xe9 (`-debugcon file:...`): a banner,
 *      MSR results and a line every 16 passes;
 *   4. optionally polls COM1 (`-serial ...`) for one-byte commands between
 *      pages: 'R' writes READY (1), '0' writes 0, 'P' prints the pass count.
 *      This lets a test make the *guest* change readiness mid-run.
 *
 * Options (-append, space separated, after the kernel file name):
 *   ready      write READY at start
 *   serial     poll COM1 for commands
 *   base=N     region start in MiB (default 16)
 *   mb=N       region size in MiB (default 32; clamped to the RAM end)
 *   delay=N    busy-wait N iterations per page (slows the dirty rate)
 *   hc         hypercall mode (below); implies READY through WRMSR
 *   hcwrong    hc, plus a negative control: the very first check expects a
 *              wrong value, so exactly one MISMATCH must be reported
 *
 * Hypercall mode (`hc`) makes the KVM_HC_MAP_GPA_RANGE calls itself with
 * VMMCALL. It is off by default and must stay off on a KVM that does not
 * deliver them: this development host's PVM-based /dev/kvm livelocks a
 * 64-bit VMMCALL. It is used by the nested rig (docs/nested.md), where L1's
 * own kvm-amd turns every VMMCALL into a KVM_EXIT_HYPERCALL for QEMU. The
 * payload switches to long mode (identity map, 2 MiB pages; its 32-bit code
 * goes on in compatibility mode, 64-bit calls go through a far call into a
 * 64-bit stub) and then, like a booting Linux SEV guest (needs -m 128 or more):
 *   E820 re-encryption; .bss..decrypted; a few 32-bit calls; READY by WRMSR
 *   (read back; a reserved bit must #GP); per-CPU pages; swiotlb as
 *   ascending calls with the 4K hint; hostile calls (reserved attribute
 *   bits, bad page-size hint, beyond 52 bits: refused by pagenc; misaligned
 *   gpa, npages 0, gfn + npages wrapping 64 bits, unknown nr: answered by KVM
 *   itself before any exit); .bss..decrypted tail re-encrypted; then, while
 *   dirtying memory,
 *   a conversion every 64 pages in a churn region (one in 8 from 32-bit
 *   code, a hostile call every 256).
 * Every RAX (and MSR result) is checked against what KVM/pagenc must return;
 * a mismatch prints "pagenc-guest: MISMATCH ..." on the debug console. The
 * guest keeps its own model of the shared pages (a bitmap over the first
 * 128 MiB, updated on every accepted call) and a tally at 0x7000:
 *   0x7000 pass  0x7004 checks  0x7008 mismatches  0x700c VMMCALLs
 *   0x7010 churn conversions  0x7014 stage (1 = boot sequence done)
 *   0x7018 model bitmap address  0x701c pages the model covers
 *   0x7020 1 while a call is in flight (from before its VMMCALL until the
 *          model has its result), 0x7024/28/2c its gpa, npages, attrs (low
 *          halves): a VMM may stop the guest after it has handled the exit but
 *          before the guest sees RAX, so the list can be one call ahead
 *
 * The pass counter is also kept at the fixed guest-physical address 0x7000
 * (PASS_ADDR) so a host can read it with `xp /1wx 0x7000`.
 */

    .set MB_MAGIC,          0x1BADB002
    .set MB_FLAGS,          0x00000003   /* page-align modules, want mem info */
    .set MB_INFO_MEM,       0x1
    .set MB_INFO_CMDLINE,   0x4
    .set MSR_KVM_MIGRATION_CONTROL, 0x4b564d08
    .set DEBUGCON,          0xe9
    .set COM1,              0x3f8
    .set PAGE,              4096
    .set PASS_ADDR,         0x7000
    .set POLL_MASK,         0xff         /* poll COM1 every 256 pages */
    /* hypercall mode */
    .set KVM_HC_MAP_GPA_RANGE, 12
    .set ENC,               0x10         /* KVM_MAP_GPA_RANGE_ENCRYPTED; 4K hint = 0 */
    .set EINVAL,            -22          /* -KVM_EINVAL */
    .set ENOSYS,            -1000        /* -KVM_ENOSYS */
    .set T_CHECKS,          0x7004
    .set T_BAD,             0x7008
    .set T_VMMCALLS,        0x700c
    .set T_CONV,            0x7010
    .set T_STAGE,           0x7014
    .set T_MODEL,           0x7018
    .set T_MODEL_PAGES,     0x701c
    .set T_INFLIGHT,        0x7020
    .set T_IF_GPA,          0x7024
    .set T_IF_NPAGES,       0x7028
    .set T_IF_ATTRS,        0x702c
    .set MODEL_PAGES,       32768        /* 128 MiB */
    .set HC_MIN_RAM,        0x07200000   /* above the per-CPU pages; SeaBIOS keeps the top of a 128 MiB guest */
    .set BSS_DEC,           0x03a00000   /* .bss..decrypted, 2 MiB */
    .set BSS_DEC_USED,      0x1c0000
    .set CHURN_BASE,        0x06000000   /* 96 MiB: conversions while running */
    .set CHURN_PAGES,       2048
    .set CHURN_MASK,        63           /* a conversion every 64 pages dirtied */
    .set SEL_CODE64,        0x18

    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .text
    .code32
    .globl _start
_start:
    cli
    movl $stack_top, %esp
    cmpl $0x2BADB002, %eax
    jne 1f
    movl %ebx, mbi_ptr
1:
    /* The multiboot spec leaves GDTR undefined: load our own flat GDT. */
    lgdt gdt_desc
    ljmp $0x08, $2f
2:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs

    call setup_idt
    call parse_cmdline

    movl $msg_banner, %esi
    call puts
    movl region_start, %eax
    call puthex
    movl $msg_dash, %esi
    call puts
    movl region_end, %eax
    call puthex
    movl $msg_nl, %esi
    call puts

    /* SeaBIOS leaves kvmclock enabled with its pvclock page at 0xe8xxx, and
     * KVM keeps rewriting that page (version, tsc, time) on every clock
     * update: host-written guest memory that changes whenever the VM stops or
     * starts, so a source/destination memory checksum would differ by it.
     * Switch it off like any OS that does not use kvmclock. */
    movl $0x4b564d01, %ecx        /* MSR_KVM_SYSTEM_TIME_NEW */
    xorl %eax, %eax
    call safe_wrmsr
    movl $0x12, %ecx              /* MSR_KVM_SYSTEM_TIME */
    xorl %eax, %eax
    call safe_wrmsr

    movl $0, PASS_ADDR
    cmpl $0, opt_hc
    je 7f
    call hc_setup
    call hc_boot_sequence
    jmp 3f
7:
    cmpl $0, opt_ready
    je 3f
    movl $1, %eax
    call write_migration_control
3:

main_loop:
    movl region_start, %edi
page_loop:
    movl PASS_ADDR, %eax
    xorl %edi, %eax
    movl %eax, (%edi)

    movl opt_delay, %ecx
    testl %ecx, %ecx
    jz 4f
5:  pause
    loop 5b
4:
    cmpl $0, opt_hc
    je 8f
    testl $(CHURN_MASK << 12), %edi
    jnz 8f
    call hc_churn
8:
    cmpl $0, opt_serial
    je 6f
    movl %edi, %eax
    shrl $12, %eax
    andl $POLL_MASK, %eax
    jnz 6f
    call poll_serial
6:
    addl $PAGE, %edi
    cmpl region_end, %edi
    jb page_loop

    incl PASS_ADDR
    testl $15, PASS_ADDR
    jnz main_loop
    movl $msg_pass, %esi
    call puts
    movl PASS_ADDR, %eax
    call puthex
    cmpl $0, opt_hc
    je 9f
    call hc_print_tally
9:
    movl $msg_nl, %esi
    call puts
    jmp main_loop

/* ---------------------------------------------------------------------- */
/* eax = value: WRMSR MSR_KVM_MIGRATION_CONTROL, then read it back. */
write_migration_control:
    pushal
    movl %eax, %ebx
    movl $msg_wrmsr, %esi
    call puts
    movl %ebx, %eax
    call puthex

    movl $0, msr_faulted
    movl $1, msr_armed
    movl $MSR_KVM_MIGRATION_CONTROL, %ecx
    movl %ebx, %eax
    xorl %edx, %edx
    wrmsr
    movl $0, msr_armed
    cmpl $0, msr_faulted
    je 1f
    movl $msg_gp, %esi
    call puts
    jmp 2f
1:
    movl $1, msr_armed
    movl $MSR_KVM_MIGRATION_CONTROL, %ecx
    xorl %eax, %eax
    rdmsr
    movl $0, msr_armed
    movl %eax, %ebx
    cmpl $0, msr_faulted
    je 3f
    movl $msg_gp_rd, %esi
    call puts
    jmp 2f
3:
    movl $msg_readback, %esi
    call puts
    movl %ebx, %eax
    call puthex
2:
    movl $msg_nl, %esi
    call puts
    popal
    ret

/* ecx = MSR, eax = low 32 bits (high 32 = 0). Returns eax = 1 if it #GP'd. */
safe_wrmsr:
    pushl %edx
    movl $0, msr_faulted
    movl $1, msr_armed
    xorl %edx, %edx
    wrmsr
    movl $0, msr_armed
    movl msr_faulted, %eax
    popl %edx
    ret

/* One command byte from COM1, if one is waiting. */
poll_serial:
    pushal
    movw $COM1 + 5, %dx          /* LSR */
    inb %dx, %al
    cmpb $0xff, %al              /* no UART at all: floating bus */
    je 9f
    testb $1, %al                /* data ready */
    jz 9f
    movw $COM1, %dx
    inb %dx, %al
    cmpb $'R', %al
    jne 1f
    movl $1, %eax
    call write_migration_control
    jmp 9f
1:
    cmpb $'0', %al
    jne 2f
    xorl %eax, %eax
    call write_migration_control
    jmp 9f
2:
    cmpb $'P', %al
    jne 9f
    movl $msg_pass, %esi
    call puts
    movl PASS_ADDR, %eax
    call puthex
    movl $msg_nl, %esi
    call puts
9:
    popal
    ret

/* ---------------------------------------------------------------------- */
/* Interrupt gates for vectors 0-31: #GP gets gp_handler, the rest fatal. */
setup_idt:
    movl $idt, %edi
    xorl %ecx, %ecx
1:
    movl $fatal_handler, %eax
    cmpl $13, %ecx
    jne 2f
    movl $gp_handler, %eax
2:
    movw %ax, (%edi)             /* offset 15:0 */
    movw $0x08, 2(%edi)          /* selector */
    movw $0x8e00, 4(%edi)        /* present, DPL0, 32-bit interrupt gate */
    shrl $16, %eax
    movw %ax, 6(%edi)            /* offset 31:16 */
    addl $8, %edi
    incl %ecx
    cmpl $32, %ecx
    jb 1b
    lidt idt_desc
    ret

/* A #GP from an armed WRMSR/RDMSR (both 2 bytes long) is skipped; any other
 * fault stops the guest with a message, so a bug never turns into silence. */
gp_handler:
    cmpl $0, msr_armed
    je fatal_handler
    movl $1, msr_faulted
    movl $0, msr_armed
    /* Drop error code, EIP, CS, EFLAGS and continue past the 2-byte
     * WRMSR/RDMSR by hand: PVM's emulator (KVM here) cannot emulate IRET
     * with paging off ("emulation failure"), and a same-privilege return
     * needs nothing IRET would restore (IF was clear, flags are don't-care). */
    movl 4(%esp), %eax
    addl $2, %eax
    addl $16, %esp
    jmp *%eax

fatal_handler:
    movl $msg_fatal, %esi
    call puts
3:  cli
    hlt
    jmp 3b

    .include "hypercall.S"

/* ---------------------------------------------------------------------- */
/* Options from the multiboot command line; defaults otherwise. */
parse_cmdline:
    pushal
    movl $16 << 20, region_start
    movl $32 << 20, %ebx          /* size */
    movl mbi_ptr, %ebp
    testl %ebp, %ebp
    jz 8f
    testl $MB_INFO_CMDLINE, (%ebp)
    jz 8f
    movl 16(%ebp), %esi           /* cmdline */

    movl $opt_s_ready, %edi
    call strstr
    testl %eax, %eax
    jz 1f
    movl $1, opt_ready
1:
    movl $opt_s_serial, %edi
    call strstr
    testl %eax, %eax
    jz 2f
    movl $1, opt_serial
2:
    movl $opt_s_hc, %edi
    call strstr
    testl %eax, %eax
    jz 21f
    movl $1, opt_hc
21:
    movl $opt_s_hcwrong, %edi
    call strstr
    testl %eax, %eax
    jz 22f
    movl $1, opt_hc
    movl $1, opt_hcwrong
22:
    movl $opt_s_base, %edi
    call strstr
    testl %eax, %eax
    jz 3f
    call atoi
    shll $20, %eax
    movl %eax, region_start
3:
    movl $opt_s_mb, %edi
    call strstr
    testl %eax, %eax
    jz 4f
    call atoi
    shll $20, %eax
    movl %eax, %ebx
4:
    movl $opt_s_delay, %edi
    call strstr
    testl %eax, %eax
    jz 8f
    call atoi
    movl %eax, opt_delay
8:
    /* Keep the region inside RAM and above the payload (first 2 MiB). */
    movl region_start, %eax
    cmpl $2 << 20, %eax
    jae 5f
    movl $2 << 20, %eax
    movl %eax, region_start
5:
    addl %ebx, %eax
    movl %eax, region_end
    testl %ebp, %ebp
    jz 7f
    testl $MB_INFO_MEM, (%ebp)
    jz 7f
    movl 8(%ebp), %ecx            /* mem_upper: KiB above 1 MiB */
    shll $10, %ecx
    addl $1 << 20, %ecx
    andl $~(PAGE - 1), %ecx
    cmpl %ecx, region_end
    jbe 7f
    movl %ecx, region_end
7:
    movl region_end, %eax
    cmpl region_start, %eax
    ja 6f
    /* Nothing fits: dirty a single page so the loop stays well-defined. */
    movl region_start, %eax
    addl $PAGE, %eax
    movl %eax, region_end
6:
    popal
    ret

/* esi = haystack, edi = needle (both NUL-terminated).
 * Returns eax = pointer just past the first match, or 0. */
strstr:
    pushl %esi
    pushl %ebx
    pushl %ecx
1:
    cmpb $0, (%esi)
    je 8f
    xorl %ecx, %ecx
2:
    movb (%edi,%ecx), %bl
    testb %bl, %bl
    jz 7f
    cmpb (%esi,%ecx), %bl
    jne 3f
    incl %ecx
    jmp 2b
3:
    incl %esi
    jmp 1b
7:
    leal (%esi,%ecx), %eax
    jmp 9f
8:
    xorl %eax, %eax
9:
    popl %ecx
    popl %ebx
    popl %esi
    ret

/* eax = pointer to decimal digits. Returns eax = value (capped at 4095 so a
 * MiB count cannot overflow when shifted). */
atoi:
    pushl %esi
    pushl %ebx
    movl %eax, %esi
    xorl %eax, %eax
1:
    movzbl (%esi), %ebx
    subl $'0', %ebx
    cmpl $9, %ebx
    ja 2f
    imull $10, %eax
    addl %ebx, %eax
    cmpl $4095, %eax
    jbe 3f
    movl $4095, %eax
3:
    incl %esi
    jmp 1b
2:
    popl %ebx
    popl %esi
    ret

/* esi = NUL-terminated string to the debug console. */
puts:
    pushl %eax
    pushl %esi
1:
    lodsb
    testb %al, %al
    jz 2f
    outb %al, $DEBUGCON
    jmp 1b
2:
    popl %esi
    popl %eax
    ret

/* eax = value printed as 8 hex digits. */
puthex:
    pushal
    movl %eax, %edx
    movl $8, %ecx
1:
    roll $4, %edx
    movl %edx, %eax
    andl $0xf, %eax
    movb hexdigits(%eax), %al
    outb %al, $DEBUGCON
    loop 1b
    popal
    ret

/* ---------------------------------------------------------------------- */
    .section .rodata
hexdigits:      .ascii "0123456789abcdef"
msg_banner:     .asciz "pagenc-guest: dirtying "
msg_dash:       .asciz "-"
msg_nl:         .asciz "\n"
msg_pass:       .asciz "pagenc-guest: pass "
msg_wrmsr:      .asciz "pagenc-guest: wrmsr MIGRATION_CONTROL="
msg_gp:         .asciz " -> #GP (no MSR filter here)"
msg_gp_rd:      .asciz " -> rdmsr #GP"
msg_readback:   .asciz " -> readback "
msg_fatal:      .asciz "\npagenc-guest: unexpected exception, halting\n"
opt_s_ready:    .asciz " ready"
opt_s_serial:   .asciz " serial"
opt_s_base:     .asciz " base="
opt_s_mb:       .asciz " mb="
opt_s_delay:    .asciz " delay="
opt_s_hc:       .asciz " hc"
opt_s_hcwrong:  .asciz " hcwrong"

    .align 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff     /* 0x08: flat 32-bit code */
    .quad 0x00cf92000000ffff     /* 0x10: flat 32-bit data */
    .quad 0x00af9a000000ffff     /* 0x18: 64-bit code (hypercall mode) */
gdt_end:

    .data
    .align 4
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt
idt_desc:
    .word 32 * 8 - 1
    .long idt
mbi_ptr:        .long 0
opt_ready:      .long 0
opt_serial:     .long 0
opt_delay:      .long 0
region_start:   .long 0
region_end:     .long 0
msr_armed:      .long 0
msr_faulted:    .long 0
opt_hc:         .long 0
opt_hcwrong:    .long 0
idt64_desc:
    .word 32 * 16 - 1
    .long idt64

    .bss
    .align 4096
pt_pml4: .skip 4096
pt_pdpt: .skip 4096
pt_pd:   .skip 4 * 4096                /* 4 x 512 2 MiB pages: the first 4 GiB */
model:   .skip MODEL_PAGES / 8         /* 1 bit per page: shared */
    .align 16
idt64:  .skip 32 * 16
idt:    .skip 32 * 8
stack:  .skip 8192
stack_top:
