; paging.asm - the "paging micro" KVM guest: a 64 KiB BIOS ROM that enters
; 64-bit long mode by itself, builds K address spaces (its own 4-level page
; tables) and runs a table of marker-bounded MMU phases.
;
; Why it exists
;   The real-mode micro guest (micro.asm) exercises memory, not paging. This
;   one makes the shadow MMU work for known reasons: CR3 switches among K
;   roots (KVM's root cache: current root + KVM_MMU_NUM_PREV_ROOTS previous
;   ones), first and repeated touches of 4 KiB-mapped pages (guest A/D bits
;   set by KVM's page-table walker), and PTE edits followed by INVLPG. The
;   counts those phases must cause are derived from KVM's source in
;   harness/image/paging.py and checked exactly by the integration tests.
;
; Build parameters (nasm -D, written by harness/image/paging.py; the defaults
; only exist so that `nasm -f bin paging.asm` works by hand):
;   TOKEN    run token, 1..65535; upper half of ECX of every phase marker
;   NAS      K, the number of address spaces, 1..MAX_AS
;   NPHASES  number of phases, 1..16
;   KINDS    comma-separated phase kinds, one per phase:
;              1 = cr3    ARG CR3 writes, round-robin over the K address spaces
;                         (the position carries over from phase to phase; the
;                         program enters address space 1 before phase 1, so
;                         the first write loads address space 2, or 1 if K = 1)
;              2 = touch  write one qword into each of the first ARG pages of
;                         the 4 KiB-mapped region
;              3 = pte    for each of the first ARG pages: flip its PTE between
;                         the region frame and an alternate frame, clear the
;                         PTE's accessed and dirty bits, then INVLPG the page
;   ARGS     comma-separated 32-bit arguments, one per phase
;
; Marker: cpuid with EAX = 0x4B564D00, ECX = (TOKEN << 16) | phase; phase 0
; after the last phase; then `out 0xf4` (isa-debug-exit: QEMU exits with 3).
;
; Physical memory (guest RAM >= 16 MiB; identity mapped)
;   0x000000-0x1FFFFF  one 2 MiB page in every address space: stack, page
;                      tables, this ROM at 0xF0000
;     0x007000         top of the stack
;     0x100000         boot PML4, 0x101000 boot PDPT, 0x102000 boot PD
;                      (2 MiB pages over 16 MiB; used only until phase 1)
;     0x103000         shared PDPT, 0x104000 shared PD
;     0x105000         shared PTs: PT_COUNT pages of 4 KiB PTEs (the region)
;     0x110000 + 4 KiB * (i - 1)   PML4 of address space i (1..K): each maps
;                      the shared PDPT in slot 0, so the K address spaces map
;                      the same memory through K distinct root tables
;   0x400000-0x7FFFFF  the touched region: MAX_PAGES pages mapped with 4 KiB PTEs
;   0x800000-0xBFFFFF  alternate frames the pte phase flips PTEs to
;
; All state lives in r12-r15 (cpuid clobbers eax, ebx, ecx, edx):
;   r12 = phase number, r13 = current address space (1..K)
; Interrupts stay disabled; nothing but this program runs between markers.

%define MARKER_LEAF   0x4B564D00
%define EXIT_PORT     0xf4
%define EXIT_VALUE    1

%define STACK_TOP     0x7000
%define BOOT_PML4     0x100000
%define BOOT_PDPT     0x101000
%define BOOT_PD       0x102000
%define SH_PDPT       0x103000
%define SH_PD         0x104000
%define SH_PT         0x105000
%define AS_PML4       0x110000
%define MAX_AS        32                 ; see MAX_ADDRESS_SPACES in paging.py
%define REGION        0x400000
%define ALT_REGION    0x800000
%define PT_COUNT      2                  ; PD slots 2 and 3 -> 0x400000-0x7FFFFF
%define MAX_PAGES     (PT_COUNT * 512)
%define PTE_FLIP      (REGION ^ ALT_REGION)
%define PTE_AD        0x60               ; accessed (bit 5) | dirty (bit 6)

%define KIND_CR3      1
%define KIND_TOUCH    2
%define KIND_PTE      3

%ifndef TOKEN
  %define TOKEN 1
%endif
%ifndef NAS
  %define NAS 5
%endif
%ifndef NPHASES
  %define NPHASES 5
%endif
%ifndef KINDS
  %define KINDS 1,1,2,2,3
%endif
%ifndef ARGS
  %define ARGS 5,20,64,64,16
%endif

%if TOKEN < 1 || TOKEN > 0xFFFF
  %error "TOKEN must be 1..65535"
%endif
%if NAS < 1 || NAS > MAX_AS
  %error "NAS must be 1..32"
%endif
%if NPHASES < 1 || NPHASES > 16
  %error "NPHASES must be 1..16"
%endif

; ---- real mode: F000:0000 is ROM offset 0 (linear 0xF0000) -------------------
        bits 16
        section rm start=0 vstart=0
entry16:
        cli
        cld
        mov ax, 0xF000
        mov ds, ax
        o32 lgdt [gdt_desc]
        mov eax, cr0
        or eax, 1                       ; PE
        mov cr0, eax
        jmp dword 0x08:entry32          ; flat 32-bit code, linear address

        ; The GDT is in ROM: every descriptor has its accessed bit set already,
        ; or loading it would make the CPU (KVM's emulator) write to the ROM.
        align 8
gdt:    dq 0
        dq 0x00CF9B000000FFFF           ; 0x08: 32-bit code, flat
        dq 0x00CF93000000FFFF           ; 0x10: data, flat
        dq 0x00AF9B000000FFFF           ; 0x18: 64-bit code
gdt_end:
gdt_desc:
        dw gdt_end - gdt - 1
        dd 0xF0000 + gdt

; ---- protected mode, then long mode: linear addresses ------------------------
        section pm start=0x1000 vstart=0xF1000
        bits 32
entry32:
        mov ax, 0x10
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov esp, STACK_TOP

        ; Boot tables: 16 MiB identity-mapped with 2 MiB pages.
        mov edi, BOOT_PML4
        mov ecx, 3 * 1024
        xor eax, eax
        rep stosd
        mov dword [BOOT_PML4], BOOT_PDPT | 3
        mov dword [BOOT_PDPT], BOOT_PD | 3
        xor ecx, ecx
.boot_pd:
        mov eax, ecx
        shl eax, 21
        or eax, 0x83                    ; present, writable, 2 MiB
        mov [BOOT_PD + ecx * 8], eax
        inc ecx
        cmp ecx, 8
        jb .boot_pd

        mov eax, cr4
        or eax, 0x20                    ; PAE
        mov cr4, eax
        mov eax, BOOT_PML4
        mov cr3, eax
        mov ecx, 0xC0000080             ; EFER
        rdmsr
        or eax, 0x100                   ; LME
        wrmsr
        mov eax, cr0
        or eax, 0x80000000              ; PG: long mode becomes active
        mov cr0, eax
        jmp 0x18:entry64

        bits 64
entry64:
        mov rsp, STACK_TOP

        ; Shared PDPT, PD and PTs, and K PML4s: zero them, then fill them.
        mov edi, SH_PDPT
        mov ecx, (2 + PT_COUNT) * 512
        xor eax, eax
        rep stosq
        mov edi, AS_PML4
        mov ecx, NAS * 512
        rep stosq

        mov qword [SH_PDPT], SH_PD | 3
        mov qword [SH_PD], 0x000000 | 0x83          ; 0-2 MiB: one 2 MiB page
        mov qword [SH_PD + 8], 0x200000 | 0x83      ; 2-4 MiB: one 2 MiB page
        xor ecx, ecx
.pd_pts:
        mov eax, ecx
        shl eax, 12
        add eax, SH_PT | 3
        mov [SH_PD + 16 + rcx * 8], rax             ; PD slots 2.. -> the PTs
        inc ecx
        cmp ecx, PT_COUNT
        jb .pd_pts
        xor ecx, ecx
.ptes:
        mov eax, ecx
        shl eax, 12
        add eax, REGION | 3                         ; present, writable; A = D = 0
        mov [SH_PT + rcx * 8], rax
        inc ecx
        cmp ecx, MAX_PAGES
        jb .ptes
        xor ecx, ecx
.pml4s:
        mov eax, ecx
        shl eax, 12
        mov qword [AS_PML4 + rax], SH_PDPT | 3
        inc ecx
        cmp ecx, NAS
        jb .pml4s

        ; Leave the boot tables for address space 1 before phase 1, so every
        ; phase runs on 4 KiB-mapped address spaces and the first CR3 write of
        ; a cr3 phase loads address space 2 (or 1 again when K = 1).
        mov eax, AS_PML4
        mov cr3, rax
        mov r13d, 1
        mov r12d, 1

phase_loop:
        ; ---- marker(k) -----------------------------------------------------
        mov eax, MARKER_LEAF
        mov ecx, TOKEN << 16
        or ecx, r12d
        cpuid

        mov eax, [kinds_tbl + r12 * 4 - 4]
        mov r8d, [args_tbl + r12 * 4 - 4]
        cmp eax, KIND_CR3
        je do_cr3
        cmp eax, KIND_TOUCH
        je do_touch
        cmp eax, KIND_PTE
        je do_pte
        jmp phase_done                  ; unreachable: paging.py checks the kinds

do_cr3:                                 ; r8 = CR3 writes left
        inc r13d
        cmp r13d, NAS
        jbe .load
        mov r13d, 1                     ; round robin: K -> 1
.load:
        mov eax, r13d
        shl eax, 12
        add eax, AS_PML4 - 0x1000       ; PML4 of address space r13
        mov cr3, rax                    ; no PCID: a full flush, KVM's kvm_set_cr3
        dec r8d
        jnz do_cr3
        jmp phase_done

do_touch:                               ; r8 = pages to write
        mov edi, REGION
.touch:
        mov [rdi], r12                  ; one write per 4 KiB page
        add rdi, 4096
        dec r8d
        jnz .touch
        jmp phase_done

do_pte:                                 ; r8 = PTEs to edit
        mov esi, SH_PT
        mov edi, REGION
.pte:
        mov rax, [rsi]
        xor rax, PTE_FLIP               ; region frame <-> alternate frame
        and al, ~PTE_AD & 0xFF          ; the next touch must set A and D again
        mov [rsi], rax
        invlpg [rdi]
        add rsi, 8
        add rdi, 4096
        dec r8d
        jnz .pte

phase_done:
        inc r12d
        cmp r12d, NPHASES
        jbe phase_loop

        ; ---- marker(0), then leave -------------------------------------------
        mov eax, MARKER_LEAF
        mov ecx, TOKEN << 16
        cpuid
        mov al, EXIT_VALUE
        out EXIT_PORT, al
halt:
        cli
        hlt
        jmp halt

; ---- phase tables (read-only, in the ROM) ------------------------------------
        align 4
kinds_tbl:      dd KINDS
kinds_end:
args_tbl:       dd ARGS
args_end:
        ; Table sizes must match NPHASES: a negative TIMES count fails the build.
        times -((kinds_end - kinds_tbl) != 4 * NPHASES) db 0
        times -((args_end - args_tbl) != 4 * NPHASES) db 0

; ---- reset vector: F000:FFF0 --------------------------------------------------
        section reset start=0xFFF0 vstart=0xFFF0
        bits 16
        jmp 0xF000:entry16
        times 16 - ($ - $$) db 0
