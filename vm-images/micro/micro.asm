; micro.asm - the "micro" KVM guest: a 512-byte real-mode boot sector that
; runs a table of memory-touching phases bracketed by phase markers.
;
; Why it exists
;   Stock kernels cannot run under -accel kvm on hosts whose KVM is the PVM
;   backend (see HOST-FACTS.md), but this program can, and the KVM events it
;   causes are real. It is the test vehicle for the host tracer: the amount of
;   work in each phase is known exactly, so per-phase event counts can be
;   checked against it.
;
; Build parameters (nasm -D, written by harness/image/micro.py; the defaults
; below only exist so that `nasm -f bin micro.asm` works by hand):
;   TOKEN    run token, 1..65535; goes into the upper half of ECX of every marker
;   NPHASES  number of phases, 1..16
;   PAGES    comma-separated 4 KiB page counts, one per phase (e.g. 16,32,64)
;   REPEATS  comma-separated pass counts, one per phase (e.g. 8,8,8)
;   BIOS_ROM if defined, the output is a 64 KiB BIOS ROM whose first 512
;            bytes are the boot sector (see the end of this file)
; The parameters are -D defines rather than bytes patched into a prebuilt
; binary so that the assembler itself checks them (ranges, table sizes, the
; 510-byte limit) and the source stays the single description of the layout.
; micro.py validates everything again with friendlier messages.
;
; What it does (BIOS loads it from the floppy to 0000:7C00, real mode; or the
; BIOS_ROM stub at the end copies it there)
;   for k = 1..NPHASES:
;     marker(k)                      cpuid EAX=0x4B564D00, ECX=(TOKEN<<16)|k
;     repeat REPEATS[k-1] times:     one pass over this phase's region
;       for each of PAGES[k-1] pages:
;         write every 16-bit word (2048 per page) with an explicit
;         mov / add / loop sequence
;   marker(0)                        phase 0 = "outside any phase"
;   out 0xf4, al  with al = 1        isa-debug-exit: QEMU exits with (1<<1)|1 = 3
;   cli; hlt forever                 fallback if there is no isa-debug-exit device
;
; Why an explicit loop and not `rep stosw`
;   On a PVM host every guest instruction of this real-mode program is
;   emulated and each one fires kvm:kvm_emulate_insn. Three instructions per
;   word make that count proportional to the memory written:
;   per pass over one page = 3 * 2048 + 8 instructions. `rep stosw` would be
;   one instruction per page and hide the work from that tracepoint.
;
; Memory layout
;   Phases get consecutive, disjoint regions starting at physical 0x10000
;   (segment 0x1000): phase 1 owns the first PAGES[0] pages, phase 2 the next
;   PAGES[1], and so on. Disjoint regions make first-touch MMU work (EPT/NPT
;   violations, shadow-page faults) fall into the phase that owns the pages,
;   in proportion to its page count. The sum of all pages must be <= 128, so
;   the last page ends at or below 0x90000, clear of the EBDA below 0xA0000.
;   The stack (SS:SP = 0000:7C00, growing down) and this code stay below
;   0x10000 and are never overwritten.
;
; Interrupts stay disabled (cli) from the first instruction on, so no BIOS
; timer handler runs inside a phase: the instructions between two markers are
; exactly this program's loop.

%define MARKER_LEAF   0x4B564D00       ; "KVM\0": the shared phase-marker CPUID leaf
%define EXIT_PORT     0xf4             ; isa-debug-exit iobase
%define EXIT_VALUE    1                ; QEMU exit status = (EXIT_VALUE << 1) | 1 = 3
%define REGION_SEG    0x1000           ; first touched byte at 0x10000
%define PAGE_PARAS    0x100            ; 4096 bytes = 0x100 paragraphs (segment units)
%define WORDS_PER_PAGE 2048
%define MAX_PAGES     128              ; 0x10000 + 128 * 4 KiB = 0x90000

%ifndef TOKEN
  %define TOKEN 1
%endif
%ifndef NPHASES
  %define NPHASES 3
%endif
%ifndef PAGES
  %define PAGES 16,32,64
%endif
%ifndef REPEATS
  %define REPEATS 1,1,1
%endif

%if TOKEN < 1 || TOKEN > 0xFFFF
  %error "TOKEN must be 1..65535"
%endif
%if NPHASES < 1 || NPHASES > 16
  %error "NPHASES must be 1..16"
%endif

        bits 16
        org 0x7c00

start:
        cli                             ; no interrupts: nothing but this loop runs
        cld
        xor ax, ax
        mov ds, ax                      ; tables are addressed as 0000:7Cxx
        mov ss, ax
        mov sp, 0x7c00                  ; stack just below the boot sector
        jmp 0x0000:.cs_zero             ; some BIOSes enter at 07C0:0000; make CS=0
.cs_zero:
        mov si, 1                       ; si = phase number k (1-based)
        mov bp, REGION_SEG              ; bp = first segment of phase k's region

phase_loop:
        ; ---- marker(k): cpuid traps to KVM, seen as kvm:kvm_cpuid ----------
        mov eax, MARKER_LEAF
        mov ecx, TOKEN << 16
        or cx, si                       ; ECX = (TOKEN << 16) | k
        cpuid                           ; clobbers eax, ebx, ecx, edx only

        ; ---- this phase's parameters from the tables -----------------------
        mov bx, si
        dec bx
        shl bx, 1                       ; bx = 2 * (k - 1): index into dw tables
        mov ax, [pages_tbl + bx]
        mov [cur_pages], ax
        mov dx, [repeats_tbl + bx]      ; dx = passes left

pass_loop:
        mov bx, [cur_pages]             ; bx = pages left in this pass
        mov es, bp                      ; es = first page of the region
page_loop:
        xor di, di                      ; start of this page
        mov cx, WORDS_PER_PAGE
        mov ax, si                      ; value written: the phase number
word_loop:                              ; 3 emulated instructions per word
        mov [es:di], ax
        add di, 2
        loop word_loop

        mov ax, es
        add ax, PAGE_PARAS              ; next 4 KiB page
        mov es, ax
        dec bx
        jnz page_loop

        dec dx
        jnz pass_loop

        ; ---- advance to the next phase's region and phase number -----------
        mov ax, [cur_pages]
        shl ax, 8                       ; pages * 0x100 paragraphs (pages <= 128)
        add bp, ax
        inc si
        cmp si, NPHASES
        jbe phase_loop

        ; ---- marker(0): the workload is over -------------------------------
        mov eax, MARKER_LEAF
        mov ecx, TOKEN << 16            ; phase 0 = outside any phase
        cpuid

        ; ---- leave: isa-debug-exit, else halt forever ----------------------
        mov al, EXIT_VALUE
        out EXIT_PORT, al
halt:
        cli
        hlt
        jmp halt

; ---- data --------------------------------------------------------------------
cur_pages:      dw 0                    ; page count of the running phase

pages_tbl:      dw PAGES
pages_end:
repeats_tbl:    dw REPEATS
repeats_end:

; Table sizes must match NPHASES. Labels are not visible to %if, so the check
; is an assembler expression: a non-zero TIMES count with a negative sign fails
; the build ("TIMES value is negative") instead of booting a wrong table.
        times -((pages_end - pages_tbl) != 2 * NPHASES) db 0
        times -((repeats_end - repeats_tbl) != 2 * NPHASES) db 0

; Pad to 510 bytes and add the boot signature; a negative count here means the
; program outgrew the sector and also fails the build.
        times 510 - ($ - $$) db 0
        dw 0xAA55

; ---- optional: the same sector as a 64 KiB BIOS ROM (nasm -DBIOS_ROM) ---------
; Booting from the floppy goes through SeaBIOS: about 9 million emulated
; instructions on a PVM host, and its floppy driver times out when a per-event
; tracer slows emulation down ("No bootable device", then QEMU idles for a
; minute). Given to QEMU as `-bios FILE` (libvirt: <loader type='rom'>), this
; ROM replaces SeaBIOS: the CPU starts at the reset vector, the stub copies
; the boot sector above (the first 512 bytes of this file, unchanged) to
; 0000:7C00 and jumps to it, so the phases run the very same bytes, about 30
; instructions after reset instead of seconds later.
; QEMU maps a 64 KiB BIOS at 0xF0000-0xFFFFF (and at the top of 4 GiB, where
; the reset vector F000:FFF0 fetches from), so ROM offset N is F000:N.
%ifdef BIOS_ROM
        section rom start=0x7c00+512 vstart=0x200
rom_entry:                              ; F000:0200
        cli
        cld
        xor ax, ax
        mov es, ax
        mov ss, ax
        mov sp, 0x7c00
        mov ax, 0xF000
        mov ds, ax
        xor si, si                      ; F000:0000 = the boot sector
        mov di, 0x7c00
        mov cx, 256                     ; 512 bytes (phase 0: rep is fine here)
        rep movsw
        jmp 0x0000:0x7c00               ; same entry state as a BIOS boot

        times 0xFFF0 - 0x200 - ($ - $$) db 0
reset_vector:                           ; F000:FFF0, the first instruction fetched
        jmp 0xF000:rom_entry
        times 0x10000 - 0x200 - ($ - $$) db 0
%endif
