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

    cmpl $0, opt_ready
    je 3f
    movl $1, %eax
    call write_migration_control
3:
    movl $0, PASS_ADDR

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

    .align 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff     /* 0x08: flat 32-bit code */
    .quad 0x00cf92000000ffff     /* 0x10: flat 32-bit data */
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

    .bss
    .align 16
idt:    .skip 32 * 8
stack:  .skip 8192
stack_top:
