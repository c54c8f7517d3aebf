// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * gmem-probe: the in-guest end of gmemtest's probe protocol.
 *
 * It maps pages of a requested kind, tells the host where they are
 * (virtual address, PFN and guest-physical address from /proc/self/pagemap,
 * page flags from /proc/kpageflags), touches them on command, and reports
 * every SIGBUS it receives field by field.  The host injects machine checks
 * at the reported GPA and compares the SIGBUS with an oracle, so everything
 * printed here is evidence: one JSON object per line on stdout.
 *
 * Why the odd shape:
 * - All output goes through one hand-written JSON writer that only uses
 *   write(2) and integer formatting, so the SIGBUS handler can use the very
 *   same code and stay async-signal-safe.
 * - Input is read with read(2) into our own buffer, never stdio, so that a
 *   siglongjmp out of a blocked read (an action-optional SIGBUS arriving while
 *   idle) cannot corrupt library state.
 * - After a SIGBUS during a command the handler siglongjmps back to the command
 *   loop: returning would re-execute the faulting load on the poisoned page forever.
 *   While idle (waiting for input) it just returns, so no input is lost.
 *
 * Protocol: see docs/architecture.md, "Probe protocol".
 * Build: gcc -static -O2 -Wall -Wextra -Werror -o gmem-probe gmem_probe.c
 */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

/*
 * Kernel uAPI constants, in one place.  Defined here rather than taken from
 * <linux/...> so that the probe builds against any libc's headers.
 */
/* include/uapi/linux/kernel-page-flags.h */
#define GP_KPF_HUGE 17
#define GP_KPF_HWPOISON 19
#define GP_KPF_THP 22
/* Documentation/admin-guide/mm/pagemap.rst: bit 63 present, bits 0-54 PFN */
#define GP_PM_PRESENT (1ULL << 63)
#define GP_PM_PFN_MASK ((1ULL << 55) - 1)
/* include/uapi/linux/prctl.h */
#define GP_PR_MCE_KILL 33
#define GP_PR_MCE_KILL_SET 1
#define GP_PR_MCE_KILL_LATE 0
#define GP_PR_MCE_KILL_EARLY 1
#define GP_PR_MCE_KILL_GET 34
/* include/uapi/asm-generic/mman-common.h, include/uapi/asm-generic/hugetlb_encode.h */
#define GP_MADV_HUGEPAGE 14
#define GP_MAP_HUGETLB 0x40000
#define GP_MAP_HUGE_2MB (21U << 26)
/* include/uapi/linux/memfd.h */
#define GP_MFD_CLOEXEC 1U
/* include/uapi/linux/random.h: _IOW('R', 0x03, int[2]) and _IO('R', 0x07) */
#define GP_RNDADDENTROPY 0x40085203UL
#define GP_RNDRESEEDCRNG 0x5207UL
#define GP_MAX_ENTROPY 64

#define GP_PAGE_4K 4096UL
#define GP_PAGE_2M (2UL * 1024 * 1024)
#define GP_MAX_MAPPINGS 32
#define GP_MAX_NPAGES 4096UL
#define GP_MAX_LINE 256
#define GP_MAX_SECONDS 3600UL
#define GP_VALID_COMMANDS "map, touch, locate, flags, lock, fill, check, spin, wait, kill, refresh, readphys, quit"
#define GP_VALID_KINDS "anon4k, thp, hugetlb2m, memfd4k"

/* ---------------------------------------------------------------------- */
/* Async-signal-safe JSON line writer                                      */
/* ---------------------------------------------------------------------- */

struct jw {
	char buf[1024];
	size_t len;
	int first; /* no member written yet in the current object/array */
};

/* Set while a line is partially written, so the handler can start a fresh one. */
static volatile sig_atomic_t g_line_open;

static void raw_write(const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(STDOUT_FILENO, p, n);

		if (w < 0) {
			if (errno == EINTR)
				continue;
			_exit(3); /* nobody is listening: nothing useful left to do */
		}
		p += w;
		n -= (size_t)w;
	}
}

static void jw_flush(struct jw *w)
{
	if (w->len) {
		g_line_open = 1;
		raw_write(w->buf, w->len);
		w->len = 0;
	}
}

static void jw_raw(struct jw *w, const char *s, size_t n)
{
	while (n > 0) {
		size_t room = sizeof(w->buf) - w->len;
		size_t k = n < room ? n : room;

		memcpy(w->buf + w->len, s, k);
		w->len += k;
		s += k;
		n -= k;
		if (w->len == sizeof(w->buf))
			jw_flush(w);
	}
}

static void jw_str_raw(struct jw *w, const char *s)
{
	jw_raw(w, s, strlen(s));
}

static void jw_u64(struct jw *w, uint64_t v)
{
	char tmp[24];
	size_t i = sizeof(tmp);

	do {
		tmp[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	jw_raw(w, tmp + i, sizeof(tmp) - i);
}

static void jw_i64(struct jw *w, int64_t v)
{
	if (v < 0) {
		jw_raw(w, "-", 1);
		jw_u64(w, (uint64_t)0 - (uint64_t)v);
	} else {
		jw_u64(w, (uint64_t)v);
	}
}

static void jw_hex(struct jw *w, uint64_t v)
{
	static const char digits[] = "0123456789abcdef";
	char tmp[18];
	size_t i = sizeof(tmp);

	do {
		tmp[--i] = digits[v & 0xf];
		v >>= 4;
	} while (v);
	tmp[--i] = 'x';
	tmp[--i] = '0';
	jw_raw(w, "\"", 1);
	jw_raw(w, tmp + i, sizeof(tmp) - i);
	jw_raw(w, "\"", 1);
}

/* A JSON string; control characters and non-ASCII bytes are \u-escaped. */
static void jw_qstr(struct jw *w, const char *s)
{
	static const char digits[] = "0123456789abcdef";

	jw_raw(w, "\"", 1);
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;

		if (c == '"' || c == '\\') {
			char esc[2] = { '\\', (char)c };

			jw_raw(w, esc, 2);
		} else if (c < 0x20 || c >= 0x7f) {
			char esc[6] = { '\\', 'u', '0', '0', digits[c >> 4], digits[c & 0xf] };

			jw_raw(w, esc, 6);
		} else {
			jw_raw(w, (const char *)&c, 1);
		}
	}
	jw_raw(w, "\"", 1);
}

static void jw_key(struct jw *w, const char *key)
{
	if (!w->first)
		jw_raw(w, ",", 1);
	w->first = 0;
	jw_qstr(w, key);
	jw_raw(w, ":", 1);
}

static void jw_begin(struct jw *w, const char *event)
{
	w->len = 0;
	w->first = 1;
	jw_raw(w, "{", 1);
	jw_key(w, "event");
	jw_qstr(w, event);
}

static void jw_end(struct jw *w)
{
	jw_raw(w, "}\n", 2);
	jw_flush(w);
	g_line_open = 0;
}

static void jw_kv_u64(struct jw *w, const char *k, uint64_t v)
{
	jw_key(w, k);
	jw_u64(w, v);
}

static void jw_kv_i64(struct jw *w, const char *k, int64_t v)
{
	jw_key(w, k);
	jw_i64(w, v);
}

static void jw_kv_str(struct jw *w, const char *k, const char *v)
{
	jw_key(w, k);
	jw_qstr(w, v);
}

static void jw_kv_bool(struct jw *w, const char *k, int v)
{
	jw_key(w, k);
	jw_str_raw(w, v ? "true" : "false");
}

static void jw_kv_null(struct jw *w, const char *k)
{
	jw_key(w, k);
	jw_str_raw(w, "null");
}

static void jw_open(struct jw *w, const char *k, const char *bracket)
{
	jw_key(w, k);
	jw_str_raw(w, bracket);
	w->first = 1;
}

static void jw_elem(struct jw *w)
{
	if (!w->first)
		jw_raw(w, ",", 1);
	w->first = 1;
	jw_raw(w, "{", 1);
}

static void jw_close(struct jw *w, const char *bracket)
{
	jw_str_raw(w, bracket);
	w->first = 0;
}

/* ---------------------------------------------------------------------- */
/* State                                                                   */
/* ---------------------------------------------------------------------- */

enum kind { K_ANON4K, K_THP, K_HUGETLB2M, K_MEMFD4K };

static const char *const kind_names[] = { "anon4k", "thp", "hugetlb2m", "memfd4k" };

struct mapping {
	int used;
	enum kind kind;
	uint8_t *va;        /* start of the usable, page_size-aligned region */
	size_t size;
	size_t page_size;
	size_t npages;
	int fd;             /* memfd4k only, else -1 */
	uint64_t *pfn4k;    /* PFN of every 4 KiB frame, recorded after populate */
};

static struct mapping g_maps[GP_MAX_MAPPINGS];
static int g_pagemap_fd = -1;
static int g_kpageflags_fd = -1;
static sigjmp_buf g_cmd_env;
static volatile sig_atomic_t g_env_armed;
static const char g_idle[] = "idle";
static const char *volatile g_during = g_idle;
static volatile sig_atomic_t g_seq;

/* ---------------------------------------------------------------------- */
/* SIGBUS                                                                  */
/* ---------------------------------------------------------------------- */

static void on_sigbus(int sig, siginfo_t *si, void *uctx)
{
	struct jw w;
	struct timespec ts;
	int64_t ns = -1;
	int saved_errno = errno;

	(void)uctx;
	if (clock_gettime(CLOCK_MONOTONIC, &ts) == 0)
		ns = (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
	if (g_line_open)
		raw_write("\n", 1); /* never glue our line onto a half-written one */
	jw_begin(&w, "sigbus");
	jw_kv_i64(&w, "si_signo", sig);
	jw_kv_i64(&w, "si_code", si->si_code);
	jw_kv_u64(&w, "si_addr", (uint64_t)(uintptr_t)si->si_addr);
	jw_key(&w, "si_addr_hex");
	jw_hex(&w, (uint64_t)(uintptr_t)si->si_addr);
	jw_kv_i64(&w, "si_addr_lsb", si->si_addr_lsb);
	jw_kv_str(&w, "during", g_during);
	jw_kv_i64(&w, "seq", g_seq);
	jw_kv_i64(&w, "t_mono_ns", ns);
	jw_end(&w);
	errno = saved_errno;
	/*
	 * Idle means blocked in read(2) (or about to be): returning is safe and loses no
	 * input, whereas a jump out of a read that has already copied data would drop it.
	 */
	if (g_during == g_idle)
		return;
	if (g_env_armed)
		siglongjmp(g_cmd_env, 1);
	/* Not armed (during start-up): nothing safe to resume, so stop. */
	_exit(4);
}

/*
 * Replies are written with SIGBUS blocked, and the command is marked finished before
 * SIGBUS is unblocked again.  So a reply line is never cut by the handler, and a `sigbus`
 * whose "during" names a command means exactly that the command did not reply: an
 * asynchronous signal that lands after (or while) a reply is written is reported as
 * "idle".  No faulting access to the mappings happens while a reply is being written.
 */
static sigset_t g_sigbus_set;

static void reply_begin(struct jw *w, const char *event)
{
	sigprocmask(SIG_BLOCK, &g_sigbus_set, NULL);
	jw_begin(w, event);
}

static void reply_end(struct jw *w)
{
	jw_end(w);
	g_during = g_idle;
	sigprocmask(SIG_UNBLOCK, &g_sigbus_set, NULL);
}

/* ---------------------------------------------------------------------- */
/* Helpers                                                                 */
/* ---------------------------------------------------------------------- */

static void emit_error(const char *message, const char *input)
{
	struct jw w;

	reply_begin(&w, "error");
	jw_kv_str(&w, "message", message);
	if (input)
		jw_kv_str(&w, "input", input);
	reply_end(&w);
}

/* Error with a formatted message; only used outside the signal handler. */
static void emit_errorf(const char *input, const char *a, const char *b, const char *c)
{
	char msg[512];

	msg[0] = '\0';
	strncat(msg, a, sizeof(msg) - 1);
	if (b)
		strncat(msg, b, sizeof(msg) - strlen(msg) - 1);
	if (c)
		strncat(msg, c, sizeof(msg) - strlen(msg) - 1);
	emit_error(msg, input);
}

static int parse_u64(const char *s, uint64_t *out)
{
	char *end;
	unsigned long long v;

	if (!s || !*s || *s == '-' || *s == '+')
		return -1;
	errno = 0;
	v = strtoull(s, &end, 0);
	if (errno || *end)
		return -1;
	*out = v;
	return 0;
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Pagemap entry for a virtual address; 0 when unreadable. */
static uint64_t pagemap_entry(uintptr_t va)
{
	uint64_t e = 0;
	off_t off = (off_t)(va / GP_PAGE_4K) * 8;

	if (g_pagemap_fd < 0 || pread(g_pagemap_fd, &e, sizeof(e), off) != sizeof(e))
		return 0;
	return e;
}

static uint64_t pfn_of(uintptr_t va)
{
	uint64_t e = pagemap_entry(va);

	return (e & GP_PM_PRESENT) ? (e & GP_PM_PFN_MASK) : 0;
}

/* kpageflags of a PFN; -1 when unavailable (not root, or no PFN). */
static int64_t kpageflags_of(uint64_t pfn)
{
	uint64_t f;

	if (!pfn || g_kpageflags_fd < 0 ||
	    pread(g_kpageflags_fd, &f, sizeof(f), (off_t)(pfn * 8)) != sizeof(f))
		return -1;
	return (int64_t)f;
}

static void jw_kv_flags(struct jw *w, const char *k, int64_t flags)
{
	if (flags < 0)
		jw_kv_null(w, k);
	else
		jw_kv_u64(w, k, (uint64_t)flags);
}

/* The byte every mapping holds at each offset; the client knows the formula. */
static uint8_t pattern(unsigned id, uint64_t off)
{
	return (uint8_t)((id * 17U + (unsigned)(off % 251U)) & 0xffU);
}

/* The byte 'fill' writes at offset I of a page for SEED (1-255); never 0 at I = 0. */
static uint8_t fill_byte(unsigned seed, uint64_t i)
{
	return (uint8_t)((seed ^ (unsigned)(i * 7U + (i >> 8))) & 0xffU);
}

static struct mapping *lookup(const char *id_s, const char *input, unsigned *id_out)
{
	uint64_t id;

	if (parse_u64(id_s, &id) || id >= GP_MAX_MAPPINGS || !g_maps[id].used) {
		emit_errorf(input, "unknown mapping id '", id_s ? id_s : "",
			    "'; use an id from a 'mapped' event");
		return NULL;
	}
	*id_out = (unsigned)id;
	return &g_maps[id];
}

/* ---------------------------------------------------------------------- */
/* Commands                                                                */
/* ---------------------------------------------------------------------- */

static void *map_region(enum kind kind, size_t size, int *fd_out, const char **why)
{
	uint8_t *p;

	*fd_out = -1;
	switch (kind) {
	case K_ANON4K:
		p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		*why = "mmap(MAP_ANONYMOUS)";
		return p == MAP_FAILED ? NULL : p;
	case K_HUGETLB2M:
		p = mmap(NULL, size, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | GP_MAP_HUGETLB | GP_MAP_HUGE_2MB, -1, 0);
		*why = "mmap(MAP_HUGETLB|MAP_HUGE_2MB) (are 2 MiB huge pages reserved? vm.nr_hugepages / kernel arg hugepages=N)";
		return p == MAP_FAILED ? NULL : p;
	case K_THP: {
		/* Over-allocate, then trim to a 2 MiB-aligned window: THP needs alignment. */
		size_t span = size + GP_PAGE_2M;
		uintptr_t start, aligned;

		p = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		*why = "mmap(MAP_ANONYMOUS) for THP";
		if (p == MAP_FAILED)
			return NULL;
		start = (uintptr_t)p;
		aligned = (start + GP_PAGE_2M - 1) & ~(GP_PAGE_2M - 1);
		if (aligned > start)
			munmap(p, aligned - start);
		if (aligned + size < start + span)
			munmap((void *)(aligned + size), start + span - (aligned + size));
		if (madvise((void *)aligned, size, GP_MADV_HUGEPAGE)) {
			*why = "madvise(MADV_HUGEPAGE) (kernel without CONFIG_TRANSPARENT_HUGEPAGE?)";
			munmap((void *)aligned, size);
			return NULL;
		}
		return (void *)aligned;
	}
	case K_MEMFD4K: {
		int fd = (int)memfd_create("gmem-probe-memfd4k", GP_MFD_CLOEXEC);

		*why = "memfd_create/ftruncate/mmap(MAP_SHARED)";
		if (fd < 0)
			return NULL;
		if (ftruncate(fd, (off_t)size)) {
			close(fd);
			return NULL;
		}
		p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		if (p == MAP_FAILED) {
			close(fd);
			return NULL;
		}
		*fd_out = fd;
		return p;
	}
	}
	return NULL;
}

static void cmd_map(const char *kind_s, const char *npages_s, const char *input)
{
	struct mapping *m = NULL;
	enum kind kind;
	uint64_t npages;
	size_t i, page_size, n4k;
	unsigned id;
	const char *why = "";
	int fd, all_thp = 1;
	struct jw w;

	if (!kind_s) {
		emit_error("usage: map KIND NPAGES; valid KIND: " GP_VALID_KINDS, input);
		return;
	}
	for (i = 0; i < sizeof(kind_names) / sizeof(kind_names[0]); i++)
		if (!strcmp(kind_s, kind_names[i]))
			break;
	if (i == sizeof(kind_names) / sizeof(kind_names[0])) {
		emit_errorf(input, "unknown map kind '", kind_s, "'; valid: " GP_VALID_KINDS);
		return;
	}
	kind = (enum kind)i;
	if (parse_u64(npages_s, &npages) || npages == 0 || npages > GP_MAX_NPAGES) {
		emit_errorf(input, "bad NPAGES '", npages_s ? npages_s : "",
			    "'; valid: an integer from 1 to 4096");
		return;
	}
	for (id = 0; id < GP_MAX_MAPPINGS; id++)
		if (!g_maps[id].used) {
			m = &g_maps[id];
			break;
		}
	if (!m) {
		emit_error("too many mappings (32); the probe keeps every mapping until quit", input);
		return;
	}
	page_size = (kind == K_THP || kind == K_HUGETLB2M) ? GP_PAGE_2M : GP_PAGE_4K;
	m->size = (size_t)npages * page_size;
	m->va = map_region(kind, m->size, &fd, &why);
	if (!m->va) {
		emit_errorf(input, why, " failed: ", strerror(errno));
		return;
	}
	n4k = m->size / GP_PAGE_4K;
	m->pfn4k = calloc(n4k, sizeof(*m->pfn4k));
	if (!m->pfn4k) {
		munmap(m->va, m->size);
		if (fd >= 0)
			close(fd);
		emit_error("out of memory recording PFNs", input);
		return;
	}
	m->used = 1;
	m->kind = kind;
	m->page_size = page_size;
	m->npages = (size_t)npages;
	m->fd = fd;

	/* Populate: the write faults every page in and gives touch a known value. */
	for (i = 0; i < m->size; i++)
		m->va[i] = pattern(id, i);
	for (i = 0; i < n4k; i++)
		m->pfn4k[i] = pfn_of((uintptr_t)m->va + i * GP_PAGE_4K);

	reply_begin(&w, "mapped");
	jw_kv_u64(&w, "id", id);
	jw_kv_str(&w, "kind", kind_names[kind]);
	jw_kv_u64(&w, "va", (uint64_t)(uintptr_t)m->va);
	jw_kv_u64(&w, "size", m->size);
	jw_kv_u64(&w, "page_size", page_size);
	jw_kv_u64(&w, "npages", m->npages);
	if (kind == K_MEMFD4K)
		jw_kv_i64(&w, "fd", fd);
	if (kind == K_THP) {
		for (i = 0; i < m->npages; i++) {
			int64_t f = kpageflags_of(m->pfn4k[i * (GP_PAGE_2M / GP_PAGE_4K)]);

			if (f < 0 || !(f & (1LL << GP_KPF_THP)))
				all_thp = 0;
		}
		jw_kv_bool(&w, "thp", all_thp);
	}
	jw_open(&w, "pages", "[");
	for (i = 0; i < m->npages; i++) {
		uint64_t pfn = m->pfn4k[i * (page_size / GP_PAGE_4K)];

		jw_elem(&w);
		jw_kv_u64(&w, "va", (uint64_t)(uintptr_t)m->va + i * page_size);
		jw_kv_u64(&w, "pfn", pfn);
		jw_kv_u64(&w, "gpa", pfn << 12);
		jw_kv_flags(&w, "flags", kpageflags_of(pfn));
		jw_close(&w, "}");
	}
	jw_close(&w, "]");
	reply_end(&w);
}

static int parse_offset(struct mapping *m, const char *off_s, const char *input, uint64_t *off)
{
	if (parse_u64(off_s, off) || *off >= m->size) {
		emit_errorf(input, "bad OFFSET '", off_s ? off_s : "",
			    "'; valid: an integer from 0 to the mapping's size - 1");
		return -1;
	}
	return 0;
}

static void cmd_touch(const char *id_s, const char *off_s, const char *input)
{
	struct mapping *m;
	unsigned id;
	uint64_t off;
	volatile uint8_t *p;
	uint8_t value;
	struct jw w;

	m = lookup(id_s, input, &id);
	if (!m || parse_offset(m, off_s, input, &off))
		return;
	p = (volatile uint8_t *)(m->va + off);
	value = *p; /* the load that takes the SIGBUS on a poisoned page */
	reply_begin(&w, "touched");
	jw_kv_u64(&w, "id", id);
	jw_kv_u64(&w, "offset", off);
	jw_kv_u64(&w, "va", (uint64_t)(uintptr_t)p);
	jw_kv_u64(&w, "value", value);
	reply_end(&w);
}

/*
 * readphys GPA: the guest kernel itself loads the byte at guest-physical GPA, through the
 * direct map as /proc/kcore exposes it (the PT_LOAD whose p_paddr range holds GPA).  After a
 * system_reset this is the access that proves the host replaced a page it had poisoned: a
 * frame that stayed poisoned would make KVM signal QEMU and the kernel's load would take #MC.
 */
static void cmd_readphys(const char *gpa_s, const char *input)
{
	uint64_t gpa;
	Elf64_Ehdr eh;
	Elf64_Phdr ph;
	uint8_t value;
	struct jw w;
	int fd;

	if (parse_u64(gpa_s, &gpa)) {
		emit_errorf(input, "bad GPA '", gpa_s ? gpa_s : "", "'; valid: a guest-physical address");
		return;
	}
	fd = open("/proc/kcore", O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		emit_errorf(input, "open /proc/kcore failed: ", strerror(errno), NULL);
		return;
	}
	if (pread(fd, &eh, sizeof(eh), 0) != (ssize_t)sizeof(eh) || memcmp(eh.e_ident, ELFMAG, SELFMAG)) {
		emit_errorf(input, "/proc/kcore has no ELF header", NULL, NULL);
		close(fd);
		return;
	}
	for (unsigned i = 0; i < eh.e_phnum; i++) {
		if (pread(fd, &ph, sizeof(ph), (off_t)(eh.e_phoff + (uint64_t)i * eh.e_phentsize)) != (ssize_t)sizeof(ph))
			break;
		if (ph.p_type != PT_LOAD || ph.p_paddr == (Elf64_Addr)-1 || gpa < ph.p_paddr ||
		    gpa - ph.p_paddr >= ph.p_memsz)
			continue;
		if (pread(fd, &value, 1, (off_t)(ph.p_offset + (gpa - ph.p_paddr))) != 1) {
			emit_errorf(input, "read of /proc/kcore failed: ", strerror(errno), NULL);
			close(fd);
			return;
		}
		close(fd);
		reply_begin(&w, "physread");
		jw_kv_u64(&w, "gpa", gpa);
		jw_kv_u64(&w, "va", ph.p_vaddr + (gpa - ph.p_paddr));
		jw_kv_u64(&w, "value", value);
		reply_end(&w);
		return;
	}
	close(fd);
	emit_errorf(input, "no /proc/kcore segment maps gpa '", gpa_s, "'");
}

/*
 * lock ID: mlock the mapping, so that its guest-physical pages stay where they are while the
 * host converts them; reports how many 4 KiB pages moved since they were mapped.
 */
static void cmd_lock(const char *id_s, const char *input)
{
	struct mapping *m;
	unsigned id;
	size_t i, n4k, moved = 0;
	struct jw w;

	m = lookup(id_s, input, &id);
	if (!m)
		return;
	if (mlock(m->va, m->size)) {
		emit_errorf(input, "mlock failed: ", strerror(errno), NULL);
		return;
	}
	n4k = m->size / GP_PAGE_4K;
	for (i = 0; i < n4k; i++) {
		uint64_t pfn = pfn_of((uintptr_t)m->va + i * GP_PAGE_4K);

		moved += pfn != m->pfn4k[i];
		m->pfn4k[i] = pfn;
	}
	reply_begin(&w, "locked");
	jw_kv_u64(&w, "id", id);
	jw_kv_u64(&w, "pages", n4k);
	jw_kv_u64(&w, "moved", moved);
	reply_end(&w);
}

static int parse_seed(const char *seed_s, const char *input, unsigned *seed)
{
	uint64_t v;

	if (parse_u64(seed_s, &v) || v == 0 || v > 255) {
		emit_errorf(input, "bad SEED '", seed_s ? seed_s : "", "'; valid: an integer from 1 to 255");
		return -1;
	}
	*seed = (unsigned)v;
	return 0;
}

/*
 * The arguments of fill and check: the 4 KiB page of mapping ID that holds OFFSET (*off set to its
 * start) and SEED; NULL once the bad one has been answered with an error.
 */
static volatile uint8_t *seeded_page(const char *id_s, const char *off_s, const char *seed_s, const char *input,
				     unsigned *id, uint64_t *off, unsigned *seed)
{
	struct mapping *m = lookup(id_s, input, id);

	if (!m || parse_offset(m, off_s, input, off) || parse_seed(seed_s, input, seed))
		return NULL;
	*off &= ~(GP_PAGE_4K - 1);
	return (volatile uint8_t *)(m->va + *off);
}

/* fill ID OFFSET SEED: write fill_byte(SEED, i) over the 4 KiB page that holds OFFSET. */
static void cmd_fill(const char *id_s, const char *off_s, const char *seed_s, const char *input)
{
	unsigned id, seed;
	uint64_t off, i;
	volatile uint8_t *page;
	struct jw w;

	page = seeded_page(id_s, off_s, seed_s, input, &id, &off, &seed);
	if (!page)
		return;
	for (i = 0; i < GP_PAGE_4K; i++)
		page[i] = fill_byte(seed, i);
	reply_begin(&w, "filled");
	jw_kv_u64(&w, "id", id);
	jw_kv_u64(&w, "offset", off);
	jw_kv_u64(&w, "seed", seed);
	reply_end(&w);
}

/*
 * check ID OFFSET SEED: read the 4 KiB page that holds OFFSET back; how many bytes hold
 * fill_byte(SEED, i), how many are 0, and the first 8 bytes (little endian).
 */
static void cmd_check(const char *id_s, const char *off_s, const char *seed_s, const char *input)
{
	unsigned id, seed;
	uint64_t off, i, matches = 0, zeros = 0, first = 0;
	volatile uint8_t *page;
	struct jw w;

	page = seeded_page(id_s, off_s, seed_s, input, &id, &off, &seed);
	if (!page)
		return;
	for (i = 0; i < GP_PAGE_4K; i++) {
		uint8_t b = page[i];

		matches += b == fill_byte(seed, i);
		zeros += b == 0;
		if (i < 8)
			first |= (uint64_t)b << (8 * i);
	}
	reply_begin(&w, "checked");
	jw_kv_u64(&w, "id", id);
	jw_kv_u64(&w, "offset", off);
	jw_kv_u64(&w, "seed", seed);
	jw_kv_u64(&w, "matches", matches);
	jw_kv_u64(&w, "zeros", zeros);
	jw_kv_u64(&w, "first", first);
	reply_end(&w);
}

/* Where one byte of a mapping lives right now (the pagemap is re-read). */
static void cmd_locate(const char *id_s, const char *off_s, const char *input)
{
	struct mapping *m;
	unsigned id;
	uint64_t off, entry, pfn;
	uintptr_t va;
	struct jw w;

	m = lookup(id_s, input, &id);
	if (!m || parse_offset(m, off_s, input, &off))
		return;
	va = (uintptr_t)m->va + off;
	entry = pagemap_entry(va);
	pfn = (entry & GP_PM_PRESENT) ? (entry & GP_PM_PFN_MASK) : 0;
	reply_begin(&w, "located");
	jw_kv_u64(&w, "id", id);
	jw_kv_u64(&w, "offset", off);
	jw_kv_u64(&w, "va", va);
	jw_kv_bool(&w, "present", (entry & GP_PM_PRESENT) != 0);
	jw_kv_u64(&w, "pfn", pfn);
	jw_kv_u64(&w, "gpa", pfn ? (pfn << 12) + (va & (GP_PAGE_4K - 1)) : 0);
	jw_kv_flags(&w, "flags", kpageflags_of(pfn));
	reply_end(&w);
}

static void cmd_flags(const char *id_s, const char *input)
{
	struct mapping *m;
	unsigned id;
	size_t i, j, per = 0;
	struct jw w;

	m = lookup(id_s, input, &id);
	if (!m)
		return;
	per = m->page_size / GP_PAGE_4K;
	reply_begin(&w, "flags");
	jw_kv_u64(&w, "id", id);
	jw_open(&w, "pages", "[");
	for (i = 0; i < m->npages; i++) {
		uint64_t pfn = m->pfn4k[i * per];
		int64_t f = kpageflags_of(pfn);
		int poisoned = 0;

		for (j = 0; j < per; j++) {
			int64_t fj = j ? kpageflags_of(m->pfn4k[i * per + j]) : f;

			if (fj >= 0 && (fj & (1LL << GP_KPF_HWPOISON)))
				poisoned = 1;
		}
		jw_elem(&w);
		jw_kv_u64(&w, "va", (uint64_t)(uintptr_t)m->va + i * m->page_size);
		jw_kv_u64(&w, "pfn", pfn);
		jw_kv_u64(&w, "gpa", pfn << 12);
		jw_kv_flags(&w, "flags", f);
		jw_kv_bool(&w, "hwpoison", poisoned);
		jw_close(&w, "}");
	}
	jw_close(&w, "]");
	/* Exactly which 4 KiB frames carry KPF_HWPOISON (a THP may be split by then). */
	jw_open(&w, "hwpoison_frames", "[");
	for (i = 0; i < m->size / GP_PAGE_4K; i++) {
		int64_t f = kpageflags_of(m->pfn4k[i]);

		if (f >= 0 && (f & (1LL << GP_KPF_HWPOISON))) {
			jw_elem(&w);
			jw_kv_u64(&w, "offset", i * GP_PAGE_4K);
			jw_kv_u64(&w, "pfn", m->pfn4k[i]);
			jw_kv_u64(&w, "gpa", m->pfn4k[i] << 12);
			jw_close(&w, "}");
		}
	}
	jw_close(&w, "]");
	reply_end(&w);
}

static int parse_seconds(const char *s, const char *input, uint64_t *out)
{
	if (parse_u64(s, out) || *out > GP_MAX_SECONDS) {
		emit_errorf(input, "bad SECONDS '", s ? s : "", "'; valid: an integer from 0 to 3600");
		return -1;
	}
	return 0;
}

static void cmd_spin(const char *s, const char *input)
{
	uint64_t seconds, deadline, iterations = 0;
	volatile uint64_t sink = 0;
	struct jw w;

	if (parse_seconds(s, input, &seconds))
		return;
	deadline = now_ns() + seconds * 1000000000ULL;
	/* Stay in user mode: the clock (vDSO) is read only every 2^20 iterations. */
	for (;;) {
		for (unsigned k = 0; k < (1U << 20); k++)
			sink = sink + k;
		iterations += 1U << 20;
		if (now_ns() >= deadline)
			break;
	}
	reply_begin(&w, "spun");
	jw_kv_u64(&w, "seconds", seconds);
	jw_kv_u64(&w, "iterations", iterations);
	reply_end(&w);
}

static void cmd_wait(const char *s, const char *input)
{
	uint64_t seconds, deadline, now;
	struct jw w;

	if (parse_seconds(s, input, &seconds))
		return;
	deadline = now_ns() + seconds * 1000000000ULL;
	while ((now = now_ns()) < deadline) {
		struct timespec ts = {
			.tv_sec = (time_t)((deadline - now) / 1000000000ULL),
			.tv_nsec = (long)((deadline - now) % 1000000000ULL),
		};

		nanosleep(&ts, NULL); /* EINTR: loop re-computes the remainder */
	}
	reply_begin(&w, "waited");
	jw_kv_u64(&w, "seconds", seconds);
	reply_end(&w);
}

static void cmd_kill(const char *mode, const char *input)
{
	unsigned long how;
	int got;
	struct jw w;

	if (mode && !strcmp(mode, "early")) {
		how = GP_PR_MCE_KILL_EARLY;
	} else if (mode && !strcmp(mode, "late")) {
		how = GP_PR_MCE_KILL_LATE;
	} else {
		emit_errorf(input, "bad kill mode '", mode ? mode : "", "'; valid: early, late");
		return;
	}
	if (prctl(GP_PR_MCE_KILL, GP_PR_MCE_KILL_SET, how, 0UL, 0UL)) {
		emit_errorf(input, "prctl(PR_MCE_KILL) failed: ", strerror(errno), NULL);
		return;
	}
	got = prctl(GP_PR_MCE_KILL_GET, 0UL, 0UL, 0UL, 0UL);
	reply_begin(&w, "kill");
	jw_kv_str(&w, "mode", mode);
	jw_kv_i64(&w, "prctl_get", got);
	reply_end(&w);
}

static int hex_nibble(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

/*
 * After a restore from a snapshot: the guest's wall clock is as old as the snapshot and
 * its RNG state is the snapshot's, shared by every guest restored from it.  Step
 * CLOCK_REALTIME to the host's time and credit host entropy, then force a CRNG reseed,
 * so that what runs next (the test's processes, their ASLR, dropbear's next accept)
 * does not repeat another restored guest.  Every step's errno is reported: a failing
 * step is evidence, not a silent skip.  Returns 1 on bad arguments (nothing done).
 */
static int cmd_refresh(const char *ns_s, const char *hex, const char *input)
{
	struct {
		int entropy_count;
		int buf_size;
		unsigned char buf[GP_MAX_ENTROPY];
	} pool;
	struct timespec before, target, after;
	uint64_t ns;
	size_t len, i;
	int fd, settime_errno = 0, add_errno = 0, reseed_errno = 0;
	struct jw w;

	if (parse_u64(ns_s, &ns)) {
		emit_errorf(input, "bad realtime '", ns_s ? ns_s : "", "'; want nanoseconds since the epoch");
		return 1;
	}
	len = hex ? strlen(hex) : 0;
	if (len == 0 || len % 2 || len / 2 > GP_MAX_ENTROPY) {
		emit_error("bad entropy: want 2..128 hex digits (1..64 bytes)", input);
		return 1;
	}
	for (i = 0; i < len / 2; i++) {
		int hi = hex_nibble(hex[2 * i]), lo = hex_nibble(hex[2 * i + 1]);

		if (hi < 0 || lo < 0) {
			emit_error("bad entropy: want lower-case hex digits", input);
			return 1;
		}
		pool.buf[i] = (unsigned char)(hi << 4 | lo);
	}
	pool.buf_size = (int)(len / 2);
	pool.entropy_count = pool.buf_size * 8;
	clock_gettime(CLOCK_REALTIME, &before);
	target.tv_sec = (time_t)(ns / 1000000000ULL);
	target.tv_nsec = (long)(ns % 1000000000ULL);
	if (clock_settime(CLOCK_REALTIME, &target))
		settime_errno = errno;
	fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
	if (fd < 0) {
		add_errno = reseed_errno = errno;
	} else {
		if (ioctl(fd, GP_RNDADDENTROPY, &pool))
			add_errno = errno;
		if (ioctl(fd, GP_RNDRESEEDCRNG))
			reseed_errno = errno;
		close(fd);
	}
	clock_gettime(CLOCK_REALTIME, &after);
	reply_begin(&w, "refresh");
	jw_kv_u64(&w, "realtime_before_ns",
		  (uint64_t)before.tv_sec * 1000000000ULL + (uint64_t)before.tv_nsec);
	jw_kv_u64(&w, "realtime_set_ns", ns);
	jw_kv_u64(&w, "realtime_after_ns",
		  (uint64_t)after.tv_sec * 1000000000ULL + (uint64_t)after.tv_nsec);
	jw_kv_i64(&w, "settime_errno", settime_errno);
	jw_kv_u64(&w, "entropy_bytes", (uint64_t)pool.buf_size);
	jw_kv_i64(&w, "addentropy_errno", add_errno);
	jw_kv_i64(&w, "reseed_errno", reseed_errno);
	reply_end(&w);
	return 0;
}

/* ---------------------------------------------------------------------- */
/* Command loop                                                            */
/* ---------------------------------------------------------------------- */

static char g_in[4096];
static size_t g_in_len;

/*
 * Next input line, NUL-terminated, without the newline; NULL at EOF.
 * Over-long lines are consumed and reported as "" with *too_long set.
 */
static char *read_line(int *too_long)
{
	static char line[GP_MAX_LINE + 1];
	int discarding = 0;

	*too_long = 0;
	for (;;) {
		char *nl = memchr(g_in, '\n', g_in_len);
		ssize_t r;

		if (nl) {
			size_t n = (size_t)(nl - g_in);

			if (discarding || n > GP_MAX_LINE) {
				*too_long = 1;
				line[0] = '\0';
			} else {
				memcpy(line, g_in, n);
				line[n] = '\0';
				if (n && line[n - 1] == '\r')
					line[n - 1] = '\0';
			}
			memmove(g_in, nl + 1, g_in_len - n - 1);
			g_in_len -= n + 1;
			return line;
		}
		if (g_in_len == sizeof(g_in)) {
			discarding = 1;
			g_in_len = 0;
		}
		r = read(STDIN_FILENO, g_in + g_in_len, sizeof(g_in) - g_in_len);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return NULL;
		g_in_len += (size_t)r;
	}
}

/* How many arguments each command takes at most (an unknown command is refused by name later). */
static int max_args(const char *verb)
{
	static const struct {
		const char *verb;
		int args;
	} table[] = {
		{ "map", 2 }, { "touch", 2 }, { "locate", 2 }, { "flags", 1 }, { "lock", 1 },
		{ "fill", 3 }, { "check", 3 }, { "spin", 1 }, { "wait", 1 }, { "kill", 1 },
		{ "refresh", 2 }, { "readphys", 1 }, { "quit", 0 },
	};

	for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); i++)
		if (!strcmp(verb, table[i].verb))
			return table[i].args;
	return 3;
}

/* Returns 0 on quit. */
static int dispatch(char *line)
{
	char input[GP_MAX_LINE + 1];
	char *save = NULL, *verb, *a1, *a2, *a3, *extra;

	memcpy(input, line, strlen(line) + 1);
	verb = strtok_r(line, " \t", &save);
	a1 = strtok_r(NULL, " \t", &save);
	a2 = strtok_r(NULL, " \t", &save);
	a3 = strtok_r(NULL, " \t", &save);
	extra = strtok_r(NULL, " \t", &save);
	if (!verb)
		return 1; /* blank line: ignore */
	if (extra || (!!a1 + !!a2 + !!a3) > max_args(verb)) {
		emit_errorf(input, "too many arguments for '", verb, "'");
		return 1;
	}
	if (!strcmp(verb, "map")) {
		g_during = "map";
		cmd_map(a1, a2, input);
	} else if (!strcmp(verb, "touch")) {
		g_during = "touch";
		cmd_touch(a1, a2, input);
	} else if (!strcmp(verb, "locate")) {
		g_during = "locate";
		cmd_locate(a1, a2, input);
	} else if (!strcmp(verb, "flags")) {
		g_during = "flags";
		cmd_flags(a1, input);
	} else if (!strcmp(verb, "lock")) {
		g_during = "lock";
		cmd_lock(a1, input);
	} else if (!strcmp(verb, "fill")) {
		g_during = "fill";
		cmd_fill(a1, a2, a3, input);
	} else if (!strcmp(verb, "check")) {
		g_during = "check";
		cmd_check(a1, a2, a3, input);
	} else if (!strcmp(verb, "spin")) {
		g_during = "spin";
		cmd_spin(a1, input);
	} else if (!strcmp(verb, "wait")) {
		g_during = "wait";
		cmd_wait(a1, input);
	} else if (!strcmp(verb, "readphys")) {
		g_during = "readphys";
		cmd_readphys(a1, input);
	} else if (!strcmp(verb, "kill")) {
		g_during = "kill";
		cmd_kill(a1, input);
	} else if (!strcmp(verb, "refresh")) {
		g_during = "refresh";
		(void)cmd_refresh(a1, a2, input);
	} else if (!strcmp(verb, "quit")) {
		struct jw w;

		reply_begin(&w, "bye");
		jw_kv_str(&w, "reason", "quit");
		reply_end(&w);
		return 0;
	} else {
		emit_errorf(input, "unknown command '", verb, "'; valid: " GP_VALID_COMMANDS);
	}
	return 1;
}

int main(int argc, char **argv)
{
	struct sigaction sa;
	struct jw w;
	char *line;
	int too_long;

	/*
	 * One-shot form of "refresh", run as the first command after a restore: no shell
	 * pipeline to feed stdin, so the least guest code runs before the clock is stepped.
	 */
	if (argc == 4 && !strcmp(argv[1], "refresh")) {
		return cmd_refresh(argv[2], argv[3], "refresh (argv)");
	}
	if (argc != 1) {
		emit_error("usage: gmem-probe (commands on stdin) | gmem-probe refresh <realtime_ns> <hex>", NULL);
		return 2;
	}

	sigemptyset(&g_sigbus_set);
	sigaddset(&g_sigbus_set, SIGBUS);
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_sigbus;
	sa.sa_flags = SA_SIGINFO;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGBUS, &sa, NULL)) {
		emit_errorf(NULL, "sigaction(SIGBUS) failed: ", strerror(errno), NULL);
		return 2;
	}
	g_pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	g_kpageflags_fd = open("/proc/kpageflags", O_RDONLY | O_CLOEXEC);

	reply_begin(&w, "ready");
	jw_kv_i64(&w, "pid", getpid());
	jw_kv_u64(&w, "page_size", (uint64_t)sysconf(_SC_PAGESIZE));
	jw_kv_bool(&w, "pagemap", g_pagemap_fd >= 0);
	jw_kv_bool(&w, "kpageflags", g_kpageflags_fd >= 0);
	reply_end(&w);

	/* A SIGBUS during a command lands here, mask restored, ready for more input. */
	if (sigsetjmp(g_cmd_env, 1))
		g_during = g_idle;
	g_env_armed = 1;
	for (;;) {
		line = read_line(&too_long);
		if (!line)
			break;
		g_seq = g_seq + 1;
		if (too_long) {
			emit_error("line too long; commands are at most 256 bytes", NULL);
			continue;
		}
		if (!dispatch(line))
			return 0;
		g_during = g_idle;
	}
	reply_begin(&w, "bye");
	jw_kv_str(&w, "reason", "eof");
	reply_end(&w);
	return 0;
}
