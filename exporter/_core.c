/* xdpflow's compiled core: the per-record stages of a scan, on the numpy buffers, without copies.
 *
 * Theory of operation. A scan hands over the slots of a drained page (struct flow_slot, read
 * where they lie in the kernel's mapped slot array), one per CPU that saw a flow. Table folds
 * each slot into its flow in one pass: jiffies become epoch milliseconds (the page's time base,
 * computed exactly as exporter/merge.py does), the key is looked up in an open-addressing hash
 * table (linear probing, index of row numbers, rows dense in insertion order) and the slot's
 * counters are added, or a row is appended. The fold is merge.py's and flowtable.py's: sums,
 * max last, OR of flags, min/max TTL, and the ToS and first-packet flags of the earliest first
 * packet (on a tie the higher ToS; a bare SYN first, then the higher flags), so the result does
 * not depend on the order slots come in. expire() walks the rows once: FIN/RST (end of flow),
 * idle, active timeout, then, above the capacity, the least recently seen (lack of resources);
 * ended rows leave by swap-remove and backward-shift deletion, so the rows stay dense.
 *
 * Rows are FLOW_RECORDs held compactly (78 bytes: no end reason, times as 32-bit ms from a
 * table epoch); expire() hands FLOW_RECORDs out in a Block on huge pages.
 *
 * encode() turns FLOW_RECORD (or BIFLOW_RECORD) rows into IPFIX data records for one template
 * by a small field program built in Python from the template (exporter/ipfix/encoder.py);
 * frame() cuts them into messages exactly as the Python reference does, summing each message's
 * packets and octets on the way (what a message that is not delivered loses); send() hands a batch
 * of datagrams to a connected UDP socket, runs of equal-length datagrams as UDP GSO sends.
 *
 * exporter/flowtable.py, merge.py and the encoder's numpy path stay the references: property
 * tests compare this module with them record for record and byte for byte.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>

#define KEY_SIZE 48

/* FLOW_RECORD (exporter/records.py): packed, 87 bytes. */
typedef struct __attribute__((packed)) {
	uint8_t key[KEY_SIZE];
	uint64_t packets;
	uint64_t octets;
	uint64_t first_ms;
	uint64_t last_ms;
	uint16_t tcp_flags;
	uint8_t tos;
	uint8_t min_ttl;
	uint8_t max_ttl;
	uint8_t end_reason;
	uint8_t first_flags;
} rec_t;

/* struct flow_slot (xdp/flow.h): key, then struct flow_value; 88 bytes. */
typedef struct __attribute__((packed)) {
	uint8_t key[KEY_SIZE];
	uint64_t packets;
	uint64_t octets;
	uint64_t first_seen;
	uint64_t last_seen;
	uint16_t tcp_flags;
	uint8_t tos;
	uint8_t min_ttl;
	uint8_t max_ttl;
	uint8_t first_flags;
	uint8_t pad[2];
} slot_t;

_Static_assert(sizeof(rec_t) == 87, "FLOW_RECORD is 87 bytes");
_Static_assert(sizeof(slot_t) == 88, "struct flow_slot is 88 bytes");

#define END_IDLE 1
#define END_ACTIVE 2
#define END_OF_FLOW 3
#define END_LACK_OF_RESOURCES 5
#define TCP_FIN 0x01
#define TCP_RST 0x04

/* -- memory ------------------------------------------------------------------------------------ */

#define HUGE (2u << 20)

/* Large arrays as their own anonymous mappings, with transparent huge pages asked for: the fold
 * touches rows and index entries at random, and on a VM each TLB miss is a two-level page walk.
 * A mapping costs memory only where it is touched, so the table's rows can be reserved for its
 * whole capacity at once: they never move, and no growth holds two copies. big_free() needs the
 * size big_alloc() was given. */
static void *big_alloc(size_t bytes)
{
	if (bytes < HUGE)
		return malloc(bytes ? bytes : 1);
	void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (p == MAP_FAILED)
		return NULL;
#ifdef MADV_HUGEPAGE
	madvise(p, bytes, MADV_HUGEPAGE);
#endif
	return p;
}

static void big_free(void *p, size_t bytes)
{
	if (!p)
		return;
	if (bytes < HUGE)
		free(p);
	else
		munmap(p, bytes);
}

/* -- hashing ----------------------------------------------------------------------------------- */

static inline uint64_t key_hash(const uint8_t *k)
{
	uint64_t w[6];
	memcpy(w, k, sizeof(w));
	uint64_t h = 6;
	for (int i = 0; i < 6; i++) {
		h ^= w[i];
		h *= 0x9E3779B97F4A7C15ull;
		h ^= h >> 32;
	}
	h ^= h >> 30;
	h *= 0xBF58476D1CE4E5B9ull;
	h ^= h >> 27;
	h *= 0x94D049BB133111EBull;
	h ^= h >> 31;
	return h;
}

/* -- rows and the fold ------------------------------------------------------------------------- */

/* A flow held by the table: FLOW_RECORD without end_reason, times as signed ms from the table's
 * epoch (rows live at most an active timeout, so they fit 32 bits easily; the epoch moves when a
 * time would not). 78 bytes where a FLOW_RECORD is 87: at a million flows, 9 MB of RSS. */
typedef struct __attribute__((packed)) {
	uint8_t key[KEY_SIZE];
	uint64_t packets;
	uint64_t octets;
	int32_t first;
	int32_t last;
	uint16_t tcp_flags;
	uint8_t tos;
	uint8_t min_ttl;
	uint8_t max_ttl;
	uint8_t first_flags;
} row_t;

_Static_assert(sizeof(row_t) == 78, "row is 78 bytes");

#define EPOCH_SPAN (1LL << 30)   /* rebase when a time lies further than this from the epoch */

/* The first-packet flags that win among slots starting in the same millisecond: a bare SYN, else
 * the higher (merge.py's rule). */
static inline uint8_t pick_first_flags(uint8_t a, uint8_t b)
{
	unsigned ra = a | (((a & 0x12) == 0x02) << 8);
	unsigned rb = b | (((b & 0x12) == 0x02) << 8);
	return (uint8_t)(ra >= rb ? a : b);
}

/* Fold `add` into `cur` (both relative to the same epoch). */
static inline void fold(row_t *cur, const row_t *add)
{
	cur->packets += add->packets;
	cur->octets += add->octets;
	if (add->last > cur->last)
		cur->last = add->last;
	cur->tcp_flags |= add->tcp_flags;
	if (add->min_ttl < cur->min_ttl)
		cur->min_ttl = add->min_ttl;
	if (add->max_ttl > cur->max_ttl)
		cur->max_ttl = add->max_ttl;
	if (add->first < cur->first) {
		cur->first = add->first;
		cur->tos = add->tos;
		cur->first_flags = add->first_flags;
	} else if (add->first == cur->first) {
		if (add->tos > cur->tos)
			cur->tos = add->tos;
		cur->first_flags = pick_first_flags(cur->first_flags, add->first_flags);
	}
}

/* floor() of a double well inside the int64 range, without a libm call: truncate, then step down
 * where truncation went up (negative values with a fraction). */
static inline int64_t floor_int(double x)
{
	int64_t i = (int64_t)x;
	return (double)i > x ? i - 1 : i;
}

/* merge.TimeBase.to_ns, then ns_to_epoch_ms: the same IEEE double operations in the same order. */
static inline int64_t jiffies_to_ms(uint64_t j, int64_t start_j, int64_t start_ns, double slope, int64_t offset_ns)
{
	int64_t ns = start_ns + floor_int((double)((int64_t)j - start_j) * slope + 0.5);
	int64_t t = ns + offset_ns;
	int64_t ms = t / 1000000;
	if (t % 1000000 < 0)
		ms -= 1;  /* floor division, as numpy's // */
	return ms;
}

/* -- Table ------------------------------------------------------------------------------------- */

typedef struct {
	PyObject_HEAD
	row_t *rows;
	size_t n;
	size_t cap;          /* rows allocated */
	uint32_t *index;     /* 0: empty; else row + 1 */
	size_t mask;         /* index size - 1 (a power of 2, >= 2 x cap) */
	long long epoch;     /* ms; rows' times are relative to it */
	int has_epoch;
	uint8_t *reason;     /* an expiry in progress: each row's end reason (0: stays); else NULL */
	size_t cursor;       /* rows before it have been handed out */
	long long active_ms;
	long long idle_ms;
	long long capacity;  /* flows kept at most after expiry; 0: no bound */
} Table;

/* Put every row in the index again (a new index, or after many removals). */
static void index_fill(uint32_t *index, size_t mask, const row_t *rows, size_t n)
{
	memset(index, 0, (mask + 1) * sizeof(uint32_t));
	for (size_t r = 0; r < n; r++) {
		size_t i = key_hash(rows[r].key) & mask;
		while (index[i])
			i = (i + 1) & mask;
		index[i] = (uint32_t)(r + 1);
	}
}

/* Room for `need` rows. Rows: the reserved capacity, grown by half again when a table without one
 * outgrows it (the rows move once then). Index: a power of 2 at least twice the rows held, so its
 * resident size follows the flows, not the capacity. -1 on allocation failure, with no Python
 * error set (callers may hold no GIL). */
static int table_grow(Table *t, size_t need)
{
	if (need <= t->cap && t->index && 2 * need <= t->mask + 1)
		return 0;   /* the common case, first */
	if (need > t->cap) {
		size_t cap = t->cap ? t->cap : 1024;
		while (cap < need)
			cap += cap / 2;
		if (cap > 0xFFFFFFFEu)
			return -1;
		row_t *rows = big_alloc(cap * sizeof(row_t));
		if (!rows)
			return -1;
		if (t->n)
			memcpy(rows, t->rows, t->n * sizeof(row_t));
		big_free(t->rows, t->cap * sizeof(row_t));
		t->rows = rows;
		t->cap = cap;
	}
	size_t size = t->index ? t->mask + 1 : 0;
	if (2 * need <= size)
		return 0;
	if (!size)
		size = 2048;
	while (size < 2 * need)
		size *= 2;
	uint32_t *index = big_alloc(size * sizeof(uint32_t));
	if (!index)
		return -1;
	index_fill(index, size - 1, t->rows, t->n);
	big_free(t->index, t->index ? (t->mask + 1) * sizeof(uint32_t) : 0);
	t->index = index;
	t->mask = size - 1;
	return 0;
}

static int table_reserve(Table *t, size_t need)
{
	if (table_grow(t, need) < 0) {
		PyErr_NoMemory();
		return -1;
	}
	return 0;
}

/* The row holding `key`, or NULL; *pos: its index position, else where it would go. */
static inline row_t *table_find(const Table *t, const uint8_t *key, uint64_t h, size_t *pos)
{
	size_t i = h & t->mask;
	for (;;) {
		uint32_t e = t->index[i];
		if (!e) {
			*pos = i;
			return NULL;
		}
		row_t *r = &t->rows[e - 1];
		if (memcmp(r->key, key, KEY_SIZE) == 0) {
			*pos = i;
			return r;
		}
		i = (i + 1) & t->mask;
	}
}

/* Move the epoch for a time `ms` too far from it: to the middle of the span the rows and `ms` cover,
 * every row's times shifted with it. Rows live at most an active timeout (flowActiveTimeout is 16
 * bits: 18 h), so the span is far below the 24 days 32 bits hold; a row that would still not fit (a
 * clock stepped by weeks) is pinned to the nearest representable time. */
static void table_rebase(Table *t, long long ms)
{
	long long lo = ms, hi = ms;
	for (size_t r = 0; r < t->n; r++) {
		long long f = t->epoch + t->rows[r].first, l = t->epoch + t->rows[r].last;
		lo = f < lo ? f : lo;
		hi = l > hi ? l : hi;
	}
	long long epoch = lo + (hi - lo) / 2;
	long long shift = t->epoch - epoch;
	for (size_t r = 0; r < t->n; r++) {
		long long f = (long long)t->rows[r].first + shift, l = (long long)t->rows[r].last + shift;
		t->rows[r].first = (int32_t)(f < INT32_MIN ? INT32_MIN : f > INT32_MAX ? INT32_MAX : f);
		t->rows[r].last = (int32_t)(l < INT32_MIN ? INT32_MIN : l > INT32_MAX ? INT32_MAX : l);
	}
	t->epoch = epoch;
}

/* `first_ms`/`last_ms` relative to the epoch (set, or moved, as needed). */
static inline void table_times(Table *t, int64_t first_ms, int64_t last_ms, int32_t *first, int32_t *last)
{
	if (!t->has_epoch) {
		t->epoch = first_ms;
		t->has_epoch = 1;
	}
	if (first_ms - t->epoch > EPOCH_SPAN || first_ms - t->epoch < -EPOCH_SPAN ||
	    last_ms - t->epoch > EPOCH_SPAN || last_ms - t->epoch < -EPOCH_SPAN) {
		table_rebase(t, first_ms);
		if (last_ms - t->epoch > EPOCH_SPAN)
			table_rebase(t, last_ms);
	}
	*first = (int32_t)(first_ms - t->epoch);
	*last = (int32_t)(last_ms - t->epoch);
}

/* Fold one row in, or append it; the caller reserved room (no GIL needed here). */
static inline void table_add_hashed(Table *t, const row_t *add, uint64_t h)
{
	size_t pos;
	row_t *cur = table_find(t, add->key, h, &pos);
	if (cur) {
		fold(cur, add);
		return;
	}
	t->rows[t->n] = *add;
	t->index[pos] = (uint32_t)(t->n + 1);
	t->n++;
}

/* Remove index entry at `pos` (linear probing: shift back the entries that probed past it). */
static void index_remove(Table *t, size_t pos)
{
	size_t mask = t->mask;
	size_t hole = pos;
	size_t i = pos;
	for (;;) {
		i = (i + 1) & mask;
		uint32_t e = t->index[i];
		if (!e)
			break;
		size_t ideal = key_hash(t->rows[e - 1].key) & mask;
		/* e may fill the hole unless its ideal position lies cyclically in (hole, i]. */
		if (((i - ideal) & mask) >= ((i - hole) & mask)) {
			t->index[hole] = e;
			hole = i;
		}
	}
	t->index[hole] = 0;
}

static size_t index_pos_of_row(const Table *t, size_t row)
{
	size_t i = key_hash(t->rows[row].key) & t->mask;
	while (t->index[i] != row + 1)
		i = (i + 1) & t->mask;
	return i;
}

/* Remove row r: its index entry goes, the last row moves into its place. */
static void table_remove(Table *t, size_t r)
{
	index_remove(t, index_pos_of_row(t, r));
	size_t last = t->n - 1;
	if (r != last) {
		size_t lp = index_pos_of_row(t, last);
		t->rows[r] = t->rows[last];
		t->index[lp] = (uint32_t)(r + 1);
	}
	t->n--;
}

static int table_init(Table *self, PyObject *args, PyObject *kwds)
{
	static char *kwlist[] = {"active_ms", "idle_ms", "capacity", NULL};
	long long active = 60000, idle = 15000, capacity = 0;
	if (!PyArg_ParseTupleAndKeywords(args, kwds, "|LLL", kwlist, &active, &idle, &capacity))
		return -1;
	if (active <= 0 || idle <= 0 || capacity < 0) {
		PyErr_SetString(PyExc_ValueError, "timeouts must be > 0 ms and capacity >= 0");
		return -1;
	}
	self->active_ms = active;
	self->idle_ms = idle;
	self->capacity = capacity;
	/* Rows for the capacity and a scan of new flows beyond it, reserved once (touched as used). */
	if (table_reserve(self, 1024) < 0)
		return -1;
	if (capacity && capacity < 0x7FFFFFFFLL) {
		row_t *rows = big_alloc((size_t)(capacity + capacity / 2 + 1024) * sizeof(row_t));
		if (!rows) {
			PyErr_NoMemory();
			return -1;
		}
		big_free(self->rows, self->cap * sizeof(row_t));
		self->rows = rows;
		self->cap = (size_t)(capacity + capacity / 2 + 1024);
	}
	return 0;
}

static void table_dealloc(Table *self)
{
	big_free(self->rows, self->cap * sizeof(row_t));
	big_free(self->index, self->index ? (self->mask + 1) * sizeof(uint32_t) : 0);
	free(self->reason);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static int get_buffer(PyObject *obj, Py_buffer *view, size_t item, const char *what)
{
	if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS) < 0)
		return -1;
	if (view->len % (Py_ssize_t)item) {
		PyErr_Format(PyExc_ValueError, "%s: %zd bytes is not a whole number of %zu-byte items", what, view->len,
			     item);
		PyBuffer_Release(view);
		return -1;
	}
	return 0;
}

static PyObject *table_fold_slots(Table *self, PyObject *args)
{
	PyObject *obj;
	long long start_j, start_ns, offset_ns;
	double slope;
	if (!PyArg_ParseTuple(args, "OLLdL", &obj, &start_j, &start_ns, &slope, &offset_ns))
		return NULL;
	Py_buffer view;
	if (get_buffer(obj, &view, sizeof(slot_t), "slots") < 0)
		return NULL;
	size_t n = (size_t)view.len / sizeof(slot_t);
	const slot_t *s = view.buf;
	size_t folded = 0;
	unsigned long long packets = 0, octets = 0;
	int failed = 0;
	Py_BEGIN_ALLOW_THREADS
	/* Slots come in arrival order, rows in insertion order: each lookup is two cache misses (an
	 * index entry, then a row). Hash a batch ahead and prefetch both, so the misses overlap. Room
	 * is made a batch at a time: only new flows need rows. */
	enum { AHEAD = 16 };
	uint64_t h[AHEAD];
	for (size_t base = 0; base < n && !failed; base += AHEAD) {
		size_t m = n - base < AHEAD ? n - base : AHEAD;
		if (table_grow(self, self->n + m) < 0) {
			failed = 1;
			break;
		}
		for (size_t i = 0; i < m; i++) {
			h[i] = key_hash(s[base + i].key);
			__builtin_prefetch(&self->index[h[i] & self->mask]);
		}
		for (size_t i = 0; i < m; i++) {
			uint32_t e = self->index[h[i] & self->mask];
			if (e)
				__builtin_prefetch(&self->rows[e - 1]);
		}
		for (size_t i = 0; i < m; i++) {
			const slot_t *x = &s[base + i];
			if (!x->packets)
				continue;  /* never written by a program: carries nothing */
			row_t r;
			memcpy(r.key, x->key, KEY_SIZE);
			r.packets = x->packets;
			r.octets = x->octets;
			int32_t first, last;
			table_times(self, jiffies_to_ms(x->first_seen, start_j, start_ns, slope, offset_ns),
				    jiffies_to_ms(x->last_seen, start_j, start_ns, slope, offset_ns), &first, &last);
			r.first = first;
			r.last = last;
			r.tcp_flags = x->tcp_flags;
			r.tos = x->tos;
			r.min_ttl = x->min_ttl;
			r.max_ttl = x->max_ttl;
			r.first_flags = x->first_flags;
			table_add_hashed(self, &r, h[i]);
			folded++;
			packets += x->packets;
			octets += x->octets;
		}
	}
	Py_END_ALLOW_THREADS
	PyBuffer_Release(&view);
	if (failed)
		return PyErr_NoMemory();
	return Py_BuildValue("nKK", (Py_ssize_t)folded, packets, octets);
}

static PyObject *table_fold_records(Table *self, PyObject *obj)
{
	Py_buffer view;
	if (get_buffer(obj, &view, sizeof(rec_t), "records") < 0)
		return NULL;
	size_t n = (size_t)view.len / sizeof(rec_t);
	const rec_t *in = view.buf;
	if (table_reserve(self, self->n + n) < 0) {
		PyBuffer_Release(&view);
		return NULL;
	}
	Py_BEGIN_ALLOW_THREADS
	for (size_t i = 0; i < n; i++) {
		row_t r;
		memcpy(r.key, in[i].key, KEY_SIZE);
		r.packets = in[i].packets;
		r.octets = in[i].octets;
		int32_t first, last;
		table_times(self, (int64_t)in[i].first_ms, (int64_t)in[i].last_ms, &first, &last);
		r.first = first;
		r.last = last;
		r.tcp_flags = in[i].tcp_flags;
		r.tos = in[i].tos;
		r.min_ttl = in[i].min_ttl;
		r.max_ttl = in[i].max_ttl;
		r.first_flags = in[i].first_flags;
		table_add_hashed(self, &r, key_hash(r.key));
	}
	Py_END_ALLOW_THREADS
	PyBuffer_Release(&view);
	return PyLong_FromSize_t(n);
}

typedef struct {
	long long last;
	const uint8_t *key;
	size_t row;
} victim_t;

static int victim_cmp(const void *a, const void *b)
{
	const victim_t *x = a, *y = b;
	if (x->last != y->last)
		return x->last < y->last ? -1 : 1;
	return memcmp(x->key, y->key, KEY_SIZE);
}

/* Mark ended rows in `reason` (0: stays). Returns the count, or -1 on allocation failure. */
static long long table_mark(Table *t, long long now_ms, uint8_t *reason)
{
	long long ended = 0;
	long long now = now_ms - t->epoch;  /* relative, as the rows */
	for (size_t r = 0; r < t->n; r++) {
		const row_t *x = &t->rows[r];
		uint8_t why = 0;
		/* Signed: a record stamped after now (clock step) is simply not due. */
		if (now - x->first >= t->active_ms)
			why = END_ACTIVE;
		if (now - x->last >= t->idle_ms)
			why = END_IDLE;
		if (x->tcp_flags & (TCP_FIN | TCP_RST))
			why = END_OF_FLOW;
		reason[r] = why;
		ended += why != 0;
	}
	long long survivors = (long long)t->n - ended;
	if (t->capacity && survivors > t->capacity) {
		long long excess = survivors - t->capacity;
		victim_t *v = malloc((size_t)survivors * sizeof(victim_t));
		if (!v)
			return -1;
		size_t k = 0;
		for (size_t r = 0; r < t->n; r++)
			if (!reason[r])
				v[k++] = (victim_t){t->rows[r].last, t->rows[r].key, r};
		qsort(v, k, sizeof(victim_t), victim_cmp);
		for (long long i = 0; i < excess; i++)
			reason[v[i].row] = END_LACK_OF_RESOURCES;
		free(v);
		ended += excess;
	}
	return ended;
}

/* A buffer of FLOW_RECORDs for Python: big ones on huge pages (a scan's expired flows are tens of
 * MB: 4 KiB pages would be thousands of page faults each scan), exported through the buffer
 * protocol so numpy reads it in place. */
typedef struct {
	PyObject_HEAD
	void *data;
	Py_ssize_t len;
	Py_ssize_t exports;
} Block;

static int block_getbuffer(Block *self, Py_buffer *view, int flags)
{
	if (PyBuffer_FillInfo(view, (PyObject *)self, self->data, self->len, 0, flags) < 0)
		return -1;
	self->exports++;
	return 0;
}

static void block_releasebuffer(Block *self, Py_buffer *Py_UNUSED(view))
{
	self->exports--;
}

static void block_dealloc(Block *self)
{
	big_free(self->data, (size_t)self->len);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t block_len(Block *self)
{
	return self->len;
}

static PyBufferProcs block_as_buffer = {
	.bf_getbuffer = (getbufferproc)block_getbuffer,
	.bf_releasebuffer = (releasebufferproc)block_releasebuffer,
};

static PySequenceMethods block_as_sequence = {
	.sq_length = (lenfunc)block_len,
};

static PyTypeObject BlockType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "exporter._core.Block",
	.tp_doc = "FLOW_RECORDs the table handed out (a writable buffer)",
	.tp_basicsize = sizeof(Block),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_dealloc = (destructor)block_dealloc,
	.tp_as_buffer = &block_as_buffer,
	.tp_as_sequence = &block_as_sequence,
};

static Block *block_new(size_t len)
{
	Block *b = PyObject_New(Block, &BlockType);
	if (!b)
		return NULL;
	b->data = big_alloc(len);
	b->len = (Py_ssize_t)len;
	b->exports = 0;
	if (!b->data) {
		Py_DECREF(b);
		PyErr_NoMemory();
		return NULL;
	}
	return b;
}

static inline void row_to_record(const Table *t, const row_t *x, rec_t *o, uint8_t reason)
{
	memcpy(o->key, x->key, KEY_SIZE);
	o->packets = x->packets;
	o->octets = x->octets;
	o->first_ms = (uint64_t)(t->epoch + x->first);
	o->last_ms = (uint64_t)(t->epoch + x->last);
	o->tcp_flags = x->tcp_flags;
	o->tos = x->tos;
	o->min_ttl = x->min_ttl;
	o->max_ttl = x->max_ttl;
	o->end_reason = reason;
	o->first_flags = x->first_flags;
}

/* Rebuild the index from the rows (after many removals: cheaper than removing entries one by one). */
static void table_reindex(Table *t)
{
	index_fill(t->index, t->mask, t->rows, t->n);
}

/* Expiry, streamed: expire_start() marks the rows that end, take() hands their FLOW_RECORDs out a
 * block at a time (so the records of a scan never need to be in memory all at once, and one
 * buffer serves every block), expire_finish() removes the rows handed out. Rows marked but not
 * handed out (the consumer stopped early) stay in the table, unmarked: they end again next time,
 * nothing is lost. */

static int expiry_idle(Table *t)
{
	if (t->reason) {
		PyErr_SetString(PyExc_RuntimeError, "an expiry is in progress: finish it first");
		return 0;
	}
	return 1;
}

static PyObject *table_expire_start(Table *self, PyObject *arg)
{
	long long now_ms = PyLong_AsLongLong(arg);
	if ((now_ms == -1 && PyErr_Occurred()) || !expiry_idle(self))
		return NULL;
	uint8_t *reason = malloc(self->n ? self->n : 1);
	if (!reason)
		return PyErr_NoMemory();
	long long ended;
	Py_BEGIN_ALLOW_THREADS
	ended = table_mark(self, now_ms, reason);
	Py_END_ALLOW_THREADS
	if (ended < 0) {
		free(reason);
		return PyErr_NoMemory();
	}
	self->reason = reason;
	self->cursor = 0;
	return PyLong_FromLongLong(ended);
}

static PyObject *table_expire_all_start(Table *self, PyObject *arg)
{
	long why = PyLong_AsLong(arg);
	if ((why == -1 && PyErr_Occurred()) || !expiry_idle(self))
		return NULL;
	if (why < 1 || why > 5) {
		PyErr_SetString(PyExc_ValueError, "reason must be a flowEndReason 1..5");
		return NULL;
	}
	uint8_t *reason = malloc(self->n ? self->n : 1);
	if (!reason)
		return PyErr_NoMemory();
	memset(reason, (int)why, self->n);
	self->reason = reason;
	self->cursor = 0;
	return PyLong_FromSize_t(self->n);
}

/* take(block) -> records written into the block (0: none left). */
static PyObject *table_take(Table *self, PyObject *arg)
{
	if (!self->reason) {
		PyErr_SetString(PyExc_RuntimeError, "no expiry in progress: expire_start() first");
		return NULL;
	}
	Py_buffer view;
	if (PyObject_GetBuffer(arg, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
		return NULL;
	size_t room = (size_t)view.len / sizeof(rec_t);
	rec_t *o = view.buf;
	size_t k = 0, r = self->cursor;
	for (; r < self->n && k < room; r++)
		if (self->reason[r])
			row_to_record(self, &self->rows[r], &o[k++], self->reason[r]);
	self->cursor = r;
	PyBuffer_Release(&view);
	return PyLong_FromSize_t(k);
}

/* Remove the marked rows before the cursor (those handed out); end the expiry. */
static PyObject *table_expire_finish(Table *self, PyObject *Py_UNUSED(ignored))
{
	uint8_t *reason = self->reason;
	if (!reason)
		Py_RETURN_NONE;
	size_t upto = self->cursor, gone = 0;
	for (size_t r = 0; r < upto; r++)
		gone += reason[r] != 0;
	Py_BEGIN_ALLOW_THREADS
	if (gone == self->n) {
		self->n = 0;
		memset(self->index, 0, (self->mask + 1) * sizeof(uint32_t));
	} else if (gone * 4 >= self->n) {
		/* Many go: keep the survivors in order and build the index again. */
		size_t kept = 0;
		for (size_t r = 0; r < self->n; r++)
			if (r >= upto || !reason[r])
				self->rows[kept++] = self->rows[r];
		self->n = kept;
		table_reindex(self);
	} else {
		/* A few go: remove from the end backwards (swap-remove only moves rows already decided). */
		for (size_t r = upto; r-- > 0;)
			if (reason[r])
				table_remove(self, r);
	}
	Py_END_ALLOW_THREADS
	free(reason);
	self->reason = NULL;
	self->cursor = 0;
	Py_RETURN_NONE;
}

/* All of an expiry at once, into one Block (tests, and FlowTable's interface). */
static PyObject *table_take_all(Table *self, PyObject *count)
{
	if (!count)
		return NULL;
	Block *out = block_new(PyLong_AsSize_t(count) * sizeof(rec_t));
	Py_DECREF(count);
	if (!out) {
		PyObject *r = table_expire_finish(self, NULL);
		Py_XDECREF(r);
		return NULL;
	}
	PyObject *k = table_take(self, (PyObject *)out);
	Py_XDECREF(k);
	PyObject *r = table_expire_finish(self, NULL);
	Py_XDECREF(r);
	if (!k || !r) {
		Py_DECREF(out);
		return NULL;
	}
	return (PyObject *)out;
}

static PyObject *table_expire(Table *self, PyObject *arg)
{
	return table_take_all(self, table_expire_start(self, arg));
}

static PyObject *table_expire_all(Table *self, PyObject *arg)
{
	return table_take_all(self, table_expire_all_start(self, arg));
}

static PyObject *table_flows(Table *self, PyObject *Py_UNUSED(ignored))
{
	Block *out = block_new(self->n * sizeof(rec_t));
	if (!out)
		return NULL;
	for (size_t r = 0; r < self->n; r++)
		row_to_record(self, &self->rows[r], &((rec_t *)out->data)[r], 0);
	return (PyObject *)out;
}

static PyObject *table_totals(Table *self, PyObject *Py_UNUSED(ignored))
{
	unsigned long long p = 0, o = 0;
	for (size_t r = 0; r < self->n; r++) {
		p += self->rows[r].packets;
		o += self->rows[r].octets;
	}
	return Py_BuildValue("KK", p, o);
}

static Py_ssize_t table_len(Table *self)
{
	return (Py_ssize_t)self->n;
}

static PyObject *table_get_ms(Table *self, void *which)
{
	return PyLong_FromLongLong(which ? self->idle_ms : self->active_ms);
}

static int table_set_ms(Table *self, PyObject *value, void *which)
{
	long long v = value ? PyLong_AsLongLong(value) : -1;
	if (v == -1 && PyErr_Occurred())
		return -1;
	if (v <= 0) {
		PyErr_SetString(PyExc_ValueError, "a timeout must be > 0 ms");
		return -1;
	}
	if (which)
		self->idle_ms = v;
	else
		self->active_ms = v;
	return 0;
}

static PyMethodDef table_methods[] = {
	{"fold_slots", (PyCFunction)table_fold_slots, METH_VARARGS,
	 "fold_slots(slots, start_jiffies, start_ns, slope, offset_ns) -> (slots, packets, octets) folded\n\n"
	 "Fold a buffer of struct flow_slot in; times: merge.TimeBase (start, slope) and the epoch offset."},
	{"fold_records", (PyCFunction)table_fold_records, METH_O,
	 "fold_records(records) -> count\n\nFold a buffer of FLOW_RECORD (times in epoch ms) in."},
	{"expire", (PyCFunction)table_expire, METH_O,
	 "expire(now_ms) -> Block of the FLOW_RECORDs that end, removed from the table"},
	{"expire_start", (PyCFunction)table_expire_start, METH_O,
	 "expire_start(now_ms) -> flows that end; hand them out with take(), then expire_finish()"},
	{"expire_all_start", (PyCFunction)table_expire_all_start, METH_O,
	 "expire_all_start(reason) -> flows held; every one ends with `reason` (take(), expire_finish())"},
	{"take", (PyCFunction)table_take, METH_O,
	 "take(block) -> FLOW_RECORDs of the expiry in progress written into the writable buffer (0: done)"},
	{"expire_finish", (PyCFunction)table_expire_finish, METH_NOARGS,
	 "expire_finish(): remove the flows handed out; those not taken stay"},
	{"expire_all", (PyCFunction)table_expire_all, METH_O,
	 "expire_all(reason) -> Block of every FLOW_RECORD, ended with `reason`; the table is empty"},
	{"flows", (PyCFunction)table_flows, METH_NOARGS, "flows() -> Block: a copy of the live FLOW_RECORDs"},
	{"totals", (PyCFunction)table_totals, METH_NOARGS, "totals() -> (packets, octets) held"},
	{NULL, NULL, 0, NULL},
};

static PyGetSetDef table_getset[] = {
	{"active_ms", (getter)table_get_ms, (setter)table_set_ms, "active timeout (ms)", NULL},
	{"idle_ms", (getter)table_get_ms, (setter)table_set_ms, "idle timeout (ms)", (void *)1},
	{NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods table_as_sequence = {
	.sq_length = (lenfunc)table_len,
};

static PyTypeObject TableType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "exporter._core.Table",
	.tp_doc = "Table(active_ms, idle_ms, capacity=0): flows held between scans (see the module docstring)",
	.tp_basicsize = sizeof(Table),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)table_init,
	.tp_dealloc = (destructor)table_dealloc,
	.tp_methods = table_methods,
	.tp_getset = table_getset,
	.tp_as_sequence = &table_as_sequence,
};

/* -- encode ------------------------------------------------------------------------------------ */

/* One field of a data record (8 bytes, built by exporter/ipfix/encoder.py):
 *   code 1 UINT: little-endian unsigned of src_len bytes at src -> big-endian dst_len bytes
 *                (a shorter dst keeps the low bytes, as numpy's assignment into a narrower field);
 *   code 2 RAW:  dst_len bytes copied from src;
 *   code 3 COND: as UINT when the byte at cond equals cond_value, else zeros. */
typedef struct __attribute__((packed)) {
	uint8_t code;
	uint8_t dst_len;
	uint16_t src;
	uint16_t cond;
	uint8_t src_len;
	uint8_t cond_value;
} op_t;

_Static_assert(sizeof(op_t) == 8, "op is 8 bytes");

static inline uint64_t load_uint(const uint8_t *src, unsigned len)
{
	/* Fixed-size copies the compiler turns into single loads (little-endian host). */
	switch (len) {
	case 1:
		return src[0];
	case 2: {
		uint16_t v;
		memcpy(&v, src, 2);
		return v;
	}
	case 4: {
		uint32_t v;
		memcpy(&v, src, 4);
		return v;
	}
	default: {
		uint64_t v;
		memcpy(&v, src, 8);
		return v;
	}
	}
}

static inline void put_uint(uint8_t *dst, unsigned dst_len, const uint8_t *src, unsigned src_len)
{
	uint64_t v = load_uint(src, src_len);
	switch (dst_len) {
	case 1:
		dst[0] = (uint8_t)v;
		break;
	case 2: {
		uint16_t w = __builtin_bswap16((uint16_t)v);
		memcpy(dst, &w, 2);
		break;
	}
	case 4: {
		uint32_t w = __builtin_bswap32((uint32_t)v);
		memcpy(dst, &w, 4);
		break;
	}
	case 8: {
		uint64_t w = __builtin_bswap64(v);
		memcpy(dst, &w, 8);
		break;
	}
	default:
		for (unsigned i = 0; i < dst_len; i++)
			dst[dst_len - 1 - i] = (uint8_t)(i < 8 ? v >> (8 * i) : 0);
	}
}

static inline void put_raw(uint8_t *dst, const uint8_t *src, unsigned len)
{
	if (len == 4)
		memcpy(dst, src, 4);
	else if (len == 16)
		memcpy(dst, src, 16);
	else
		memcpy(dst, src, len);
}

/* A field program checked against the record size; its data record length, or -1 (exception set). */
static Py_ssize_t check_program(const Py_buffer *prog, Py_ssize_t rec_size, Py_ssize_t version_off)
{
	if (rec_size <= 0 || prog->len % (Py_ssize_t)sizeof(op_t) || version_off < 0 || version_off >= rec_size) {
		PyErr_SetString(PyExc_ValueError, "bad record size, field program or version offset");
		return -1;
	}
	const op_t *ops = prog->buf;
	size_t nops = (size_t)prog->len / sizeof(op_t);
	Py_ssize_t reclen = 0;
	for (size_t i = 0; i < nops; i++) {
		unsigned sl = ops[i].src_len;
		if (ops[i].src + (ops[i].code == 2 ? ops[i].dst_len : sl) > rec_size || ops[i].cond >= rec_size ||
		    ops[i].code < 1 || ops[i].code > 3 ||
		    (ops[i].code != 2 && sl != 1 && sl != 2 && sl != 4 && sl != 8)) {
			PyErr_SetString(PyExc_ValueError, "field program reads past the record");
			return -1;
		}
		reclen += ops[i].dst_len;
	}
	return reclen;
}

static inline uint8_t *encode_one(uint8_t *o, const uint8_t *rec, const op_t *ops, size_t nops)
{
	for (size_t i = 0; i < nops; i++) {
		const op_t *op = &ops[i];
		switch (op->code) {
		case 1:
			put_uint(o, op->dst_len, rec + op->src, op->src_len);
			break;
		case 2:
			put_raw(o, rec + op->src, op->dst_len);
			break;
		default:
			if (rec[op->cond] == op->cond_value)
				put_uint(o, op->dst_len, rec + op->src, op->src_len);
			else
				memset(o, 0, op->dst_len);
		}
		o += op->dst_len;
	}
	return o;
}

static PyObject *core_encode(PyObject *Py_UNUSED(mod), PyObject *args)
{
	PyObject *recs_obj;
	Py_buffer prog;
	Py_ssize_t rec_size, version_off;
	int version;
	if (!PyArg_ParseTuple(args, "Oy*nni", &recs_obj, &prog, &rec_size, &version_off, &version))
		return NULL;
	Py_ssize_t reclen = check_program(&prog, rec_size, version_off);
	Py_buffer view;
	if (reclen < 0 || get_buffer(recs_obj, &view, (size_t)rec_size, "records") < 0) {
		PyBuffer_Release(&prog);
		return NULL;
	}
	size_t n = (size_t)view.len / (size_t)rec_size;
	const uint8_t *in = view.buf;
	size_t count = 0;
	for (size_t r = 0; r < n; r++)
		count += in[r * (size_t)rec_size + (size_t)version_off] == version;
	PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(count * (size_t)reclen));
	if (out) {
		uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
		const op_t *ops = prog.buf;
		size_t nops = (size_t)prog.len / sizeof(op_t);
		Py_BEGIN_ALLOW_THREADS
		for (size_t r = 0; r < n; r++) {
			const uint8_t *rec = in + r * (size_t)rec_size;
			if (rec[version_off] == version)
				o = encode_one(o, rec, ops, nops);
		}
		Py_END_ALLOW_THREADS
	}
	PyBuffer_Release(&view);
	PyBuffer_Release(&prog);
	return out ? Py_BuildValue("Nn", out, (Py_ssize_t)count) : NULL;
}

/* -- frame ------------------------------------------------------------------------------------- */

static void put16(uint8_t *p, unsigned v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

static void put32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

/* One run of records of one template: either encoded already (payload: count records back to
 * back), or records to encode now (those of `version` in a FLOW_RECORD/BIFLOW_RECORD buffer). */
typedef struct {
	unsigned tid;
	Py_ssize_t reclen;
	Py_ssize_t count;
	int counted, is_flow;
	Py_buffer payload;       /* .obj NULL for a records group */
	Py_buffer records, program;
	Py_ssize_t rec_size, version_off;
	int version;
	/* Offsets of the u64 counters a message's totals add up: packets and octets, then a
	 * biflow's reverse packets and octets (-1, -1 for records without). */
	Py_ssize_t counter_off[4];
	const uint8_t *cursor, *end;
} group_t;

static void release_groups(group_t *g, Py_ssize_t n)
{
	for (Py_ssize_t i = 0; i < n; i++) {
		if (g[i].payload.obj)
			PyBuffer_Release(&g[i].payload);
		if (g[i].records.obj)
			PyBuffer_Release(&g[i].records);
		if (g[i].program.obj)
			PyBuffer_Release(&g[i].program);
	}
	free(g);
}

static int parse_group(PyObject *item, group_t *g)
{
	memset(g, 0, sizeof(*g));
	Py_ssize_t size = PyTuple_Check(item) ? PyTuple_GET_SIZE(item) : -1;
	if (size == 6) {
		if (!PyArg_ParseTuple(item, "Iny*npp", &g->tid, &g->reclen, &g->payload, &g->count, &g->counted,
				      &g->is_flow))
			return -1;
		if (g->reclen <= 0 || g->count < 0 || g->payload.len < g->reclen * g->count) {
			PyErr_SetString(PyExc_ValueError, "payload shorter than its records");
			return -1;
		}
		return 0;
	}
	if (size == 13) {
		PyObject *recs;
		Py_ssize_t *c = g->counter_off;
		if (!PyArg_ParseTuple(item, "InOy*nnippnnnn", &g->tid, &g->reclen, &recs, &g->program, &g->rec_size,
				      &g->version_off, &g->version, &g->counted, &g->is_flow, &c[0], &c[1], &c[2],
				      &c[3]))
			return -1;
		int reverse = c[2] >= 0;
		for (int i = 0; i < 4; i++)
			if ((i < 2 || reverse) && (c[i] < 0 || c[i] + 8 > g->rec_size)) {
				PyErr_SetString(PyExc_ValueError, "counter offset outside the record");
				return -1;
			}
		Py_ssize_t reclen = check_program(&g->program, g->rec_size, g->version_off);
		if (reclen < 0)
			return -1;
		if (reclen != g->reclen) {
			PyErr_SetString(PyExc_ValueError, "field program and template disagree on the record length");
			return -1;
		}
		if (get_buffer(recs, &g->records, (size_t)g->rec_size, "records") < 0)
			return -1;
		const uint8_t *in = g->records.buf;
		size_t n = (size_t)g->records.len / (size_t)g->rec_size;
		for (size_t r = 0; r < n; r++)
			g->count += in[r * (size_t)g->rec_size + (size_t)g->version_off] == g->version;
		g->cursor = in;
		g->end = in + g->records.len;
		return 0;
	}
	PyErr_SetString(PyExc_TypeError, "a group is a 6-tuple (payload) or a 13-tuple (records)");
	return -1;
}

static inline uint64_t load_u64(const uint8_t *p)
{
	uint64_t v;
	memcpy(&v, p, 8);
	return v;
}

/* The records loop of group_emit; `reverse` is a constant at each call, so each copy is branch
 * free. Locals, not g's fields or *sums: the byte stores of encode_one may alias anything, which
 * would make the compiler store and reload them around every record. */
static inline __attribute__((always_inline)) void emit_records(group_t *g, uint8_t *o, Py_ssize_t k,
							       uint64_t *sums, int reverse)
{
	const op_t *ops = g->program.buf;
	size_t nops = (size_t)g->program.len / sizeof(op_t);
	const uint8_t *cur = g->cursor, *end = g->end;
	const Py_ssize_t p0 = g->counter_off[0], o0 = g->counter_off[1];
	const Py_ssize_t p1 = g->counter_off[2], o1 = g->counter_off[3];
	uint64_t packets = 0, octets = 0;
	while (k > 0 && cur < end) {
		if (cur[g->version_off] == g->version) {
			o = encode_one(o, cur, ops, nops);
			packets += load_u64(cur + p0);
			octets += load_u64(cur + o0);
			if (reverse) {
				packets += load_u64(cur + p1);
				octets += load_u64(cur + o1);
			}
			k--;
		}
		cur += g->rec_size;
	}
	g->cursor = cur;
	sums[0] += packets;
	sums[1] += octets;
}

/* Write the next k records of group g at o; add their packets and octets to sums[0] and sums[1]
 * (a payload group's records are options: they carry none). */
static void group_emit(group_t *g, uint8_t *o, Py_ssize_t pos, Py_ssize_t k, uint64_t *sums)
{
	if (g->payload.obj) {
		memcpy(o, (const uint8_t *)g->payload.buf + pos * g->reclen, (size_t)(k * g->reclen));
		return;
	}
	if (g->counter_off[2] >= 0)
		emit_records(g, o, k, sums, 1);
	else
		emit_records(g, o, k, sums, 0);
}

/* A growing array of u64, handed to Python as the bytes of native u64s: no int object each. */
typedef struct {
	uint64_t *v;
	size_t n, cap;
} u64s_t;

/* Out of line and cold: inlined into frame(), this realloc path made the record loop ~15%
 * slower (measured at 500K flows; the compiler's code for the loop changes with it). */
static __attribute__((noinline, cold)) int u64s_grow(u64s_t *a)
{
	size_t cap = a->cap ? 2 * a->cap : 512;
	uint64_t *v = realloc(a->v, cap * sizeof(*v));
	if (!v) {
		PyErr_NoMemory();
		return -1;
	}
	a->v = v;
	a->cap = cap;
	return 0;
}

static inline int u64s_push(u64s_t *a, uint64_t x)
{
	if (a->n == a->cap && u64s_grow(a) < 0)
		return -1;
	a->v[a->n++] = x;
	return 0;
}

/* frame(groups, template_sets, mtu, odid, export_time, sequence, templates_due, messages_since,
 *       refresh_messages)
 *   -> (messages, flows_per_message, sums, sequence, templates_sent, messages_since, counts)
 * groups, in order: (template_id, record_length, payload, count, counted, is_flow), or
 * (template_id, record_length, records, record_size, program, version_offset, version, counted,
 * is_flow, packets_offset, octets_offset, reverse_packets_offset, reverse_octets_offset) to
 * encode records of one ip_version straight into the messages, summing the u64 counters at
 * those offsets (the reverse ones -1 without) per message as they pass; sums: per message its packets then its
 * octets, as native u64s in one bytes object (an int object for each would cost more than the
 * sums: ~6 ms at 500K flows); counts: the records each group held. The
 * Python reference is Encoder._build_py with encode_records (numpy); the two agree byte for
 * byte and in the sums. */
static PyObject *core_frame(PyObject *Py_UNUSED(mod), PyObject *args)
{
	PyObject *glist;
	Py_buffer tsets;
	Py_ssize_t mtu;
	unsigned long odid, export_time, sequence;
	int due;
	Py_ssize_t since, refresh_messages;
	if (!PyArg_ParseTuple(args, "O!y*nkkkpnn", &PyList_Type, &glist, &tsets, &mtu, &odid, &export_time,
			      &sequence, &due, &since, &refresh_messages))
		return NULL;
	Py_ssize_t ngroups = PyList_GET_SIZE(glist);
	group_t *groups = calloc((size_t)(ngroups ? ngroups : 1), sizeof(group_t));
	PyObject *messages = PyList_New(0), *flows = PyList_New(0), *counts = PyList_New(0);
	u64s_t totals = {NULL, 0, 0};
	uint8_t *buf = malloc((size_t)mtu);
	PyObject *result = NULL, *sums_bytes = NULL;
	Py_ssize_t parsed = 0;
	if (!groups || !messages || !flows || !counts || !buf)
		goto out;
	for (; parsed < ngroups; parsed++)
		if (parse_group(PyList_GET_ITEM(glist, parsed), &groups[parsed]) < 0) {
			parsed++;
			goto out;
		}
	int is_open = 0, templates_sent = 0;
	Py_ssize_t room = 0, used = 0;
	uint32_t seq = (uint32_t)sequence;
	unsigned long in_message = 0, flows_in_message = 0;
	uint64_t sums[2] = {0, 0};  /* packets, octets of the open message's flow records */

#define CLOSE_MESSAGE()                                                                            \
	do {                                                                                       \
		put16(buf, 10);                                                                    \
		put16(buf + 2, (unsigned)used);                                                    \
		put32(buf + 4, (uint32_t)export_time);                                             \
		put32(buf + 8, seq);                                                               \
		put32(buf + 12, (uint32_t)odid);                                                   \
		PyObject *m = PyBytes_FromStringAndSize((const char *)buf, used);                  \
		PyObject *f = PyLong_FromUnsignedLong(flows_in_message);                           \
		int failed = !m || !f || PyList_Append(messages, m) < 0 ||                         \
			     PyList_Append(flows, f) < 0 || u64s_push(&totals, sums[0]) < 0 ||     \
			     u64s_push(&totals, sums[1]) < 0;                                      \
		Py_XDECREF(m);                                                                     \
		Py_XDECREF(f);                                                                     \
		if (failed)                                                                        \
			goto out;                                                                  \
		seq += (uint32_t)in_message;                                                       \
	} while (0)

	for (Py_ssize_t gi = 0; gi < ngroups; gi++) {
		group_t *g = &groups[gi];
		PyObject *c = PyLong_FromSsize_t(g->count);
		if (!c || PyList_Append(counts, c) < 0) {
			Py_XDECREF(c);
			goto out;
		}
		Py_DECREF(c);
		Py_ssize_t pos = 0;
		while (pos < g->count) {
			if (room < 4 + g->reclen) {
				if (is_open)
					CLOSE_MESSAGE();
				in_message = flows_in_message = 0;
				sums[0] = sums[1] = 0;
				is_open = 1;
				used = 16;
				room = mtu - 16;
				if (due || since >= refresh_messages) {
					memcpy(buf + used, tsets.buf, (size_t)tsets.len);
					used += tsets.len;
					room -= tsets.len;
					due = 0;
					since = 0;
					templates_sent = 1;
				}
				since++;
			}
			Py_ssize_t k = (room - 4) / g->reclen;
			if (k > g->count - pos)
				k = g->count - pos;
			put16(buf + used, g->tid);
			put16(buf + used + 2, (unsigned)(4 + k * g->reclen));
			group_emit(g, buf + used + 4, pos, k, sums);
			used += 4 + k * g->reclen;
			room -= 4 + k * g->reclen;
			pos += k;
			if (g->counted)
				in_message += (unsigned long)k;
			if (g->is_flow)
				flows_in_message += (unsigned long)k;
		}
	}
	if (is_open)
		CLOSE_MESSAGE();
#undef CLOSE_MESSAGE
	sums_bytes = PyBytes_FromStringAndSize((const char *)totals.v, (Py_ssize_t)(totals.n * sizeof(uint64_t)));
	if (sums_bytes)
		result = Py_BuildValue("OOOkinO", messages, flows, sums_bytes, (unsigned long)seq, templates_sent,
				       since, counts);
out:
	free(buf);
	if (groups)
		release_groups(groups, parsed);
	PyBuffer_Release(&tsets);
	Py_XDECREF(messages);
	Py_XDECREF(flows);
	Py_XDECREF(counts);
	Py_XDECREF(sums_bytes);
	free(totals.v);
	return result;
}

/* -- send ------------------------------------------------------------------------------------- */

#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif

#define MAX_SEGMENTS 64   /* datagrams per UDP_SEGMENT send (the kernel's UDP_MAX_SEGMENTS) */
#define MAX_GSO_BYTES 65000

static int gso_broken;    /* the kernel or the route refused UDP_SEGMENT once: send one by one */

/* send(fd, messages, start, segment=True) -> (next, errno): the messages from `start` on, to a
 * connected datagram socket, until all are sent (next == len, errno 0) or one fails (next: that
 * one, errno: why). With `segment`, a run of datagrams of equal length goes as one UDP_SEGMENT
 * (GSO) send: the kernel cuts it into the same datagrams after one pass through the stack,
 * instead of one pass each. A failed send is reported for its first datagram, as a plain send of
 * that datagram would have been (after an ICMP error the kernel refuses the next send whole and
 * transmits nothing). Not sendmmsg: when one of its messages fails after others went, the error
 * is dropped, and a refusal would go uncounted. Where the path refuses segmentation itself,
 * datagrams go one a send from then on. */
static PyObject *core_send(PyObject *Py_UNUSED(mod), PyObject *args)
{
	int fd, segment = 1;
	PyObject *list;
	Py_ssize_t start;
	if (!PyArg_ParseTuple(args, "iO!n|p", &fd, &PyList_Type, &list, &start, &segment))
		return NULL;
	Py_ssize_t n = PyList_GET_SIZE(list);
	for (Py_ssize_t i = start; i < n; i++)
		if (!PyBytes_Check(PyList_GET_ITEM(list, i))) {
			PyErr_SetString(PyExc_TypeError, "messages must be bytes");
			return NULL;
		}
	struct iovec iov[MAX_SEGMENTS];
	union {
		char buf[CMSG_SPACE(sizeof(uint16_t))];
		struct cmsghdr align;
	} ctl;
	int err = 0;
	Py_BEGIN_ALLOW_THREADS
	while (start < n) {
		PyObject *m = PyList_GET_ITEM(list, start);
		Py_ssize_t len = PyBytes_GET_SIZE(m);
		Py_ssize_t c = 1;
		if (segment && !gso_broken && len > 0)
			while (start + c < n && c < MAX_SEGMENTS && (c + 1) * len <= MAX_GSO_BYTES &&
			       PyBytes_GET_SIZE(PyList_GET_ITEM(list, start + c)) == len)
				c++;
		ssize_t r;
		if (c == 1) {
			r = send(fd, PyBytes_AS_STRING(m), (size_t)len, MSG_DONTWAIT);
		} else {
			struct msghdr h;
			memset(&h, 0, sizeof(h));
			for (Py_ssize_t j = 0; j < c; j++) {
				PyObject *x = PyList_GET_ITEM(list, start + j);
				iov[j].iov_base = PyBytes_AS_STRING(x);
				iov[j].iov_len = (size_t)len;
			}
			h.msg_iov = iov;
			h.msg_iovlen = (size_t)c;
			h.msg_control = ctl.buf;
			h.msg_controllen = sizeof(ctl.buf);
			struct cmsghdr *cm = CMSG_FIRSTHDR(&h);
			cm->cmsg_level = SOL_UDP;
			cm->cmsg_type = UDP_SEGMENT;
			cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
			uint16_t seg = (uint16_t)len;
			memcpy(CMSG_DATA(cm), &seg, sizeof(seg));
			r = sendmsg(fd, &h, MSG_DONTWAIT);
		}
		if (r >= 0) {
			start += c;
			continue;
		}
		int e = errno;
		if (e == EINTR)
			continue;
		if (c > 1 && (e == EINVAL || e == EOPNOTSUPP || e == ENOPROTOOPT || e == EIO || e == EMSGSIZE)) {
			gso_broken = 1;  /* segmentation refused on this path: from now on one datagram a send */
			continue;
		}
		err = e;
		break;
	}
	Py_END_ALLOW_THREADS
	return Py_BuildValue("ni", start, err);
}

/* -- module ------------------------------------------------------------------------------------ */

static PyObject *core_block(PyObject *Py_UNUSED(mod), PyObject *arg)
{
	Py_ssize_t n = PyLong_AsSsize_t(arg);
	if (n < 0) {
		if (!PyErr_Occurred())
			PyErr_SetString(PyExc_ValueError, "a block has >= 0 bytes");
		return NULL;
	}
	return (PyObject *)block_new((size_t)n);
}

static PyMethodDef core_methods[] = {
	{"block", core_block, METH_O, "block(nbytes) -> a writable buffer on huge pages where big"},
	{"encode", core_encode, METH_VARARGS,
	 "encode(records, program, record_size, version_offset, version) -> (payload, count)\n\n"
	 "Data records of every record whose ip_version is `version`, back to back."},
	{"frame", core_frame, METH_VARARGS,
	 "frame(groups, template_sets, mtu, odid, export_time, sequence, templates_due, messages_since, "
	 "refresh_messages) -> (messages, flows_per_message, sums, sequence, templates_sent, messages_since, counts)"},
	{"send", core_send, METH_VARARGS,
	 "send(fd, messages, start, segment=True) -> (next, errno): to a connected datagram socket, runs of "
	 "equal-length datagrams as UDP GSO sends"},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef core_module = {
	PyModuleDef_HEAD_INIT, "exporter._core",
	"xdpflow's compiled core: flow table, IPFIX record encoding and framing, batched send.", -1, core_methods,
	NULL, NULL, NULL, NULL,
};

static int add_layout(PyObject *m, const char *name, const size_t *offsets, const char *const *names, int count)
{
	PyObject *d = PyDict_New();
	if (!d)
		return -1;
	for (int i = 0; i < count; i++) {
		PyObject *v = PyLong_FromSize_t(offsets[i]);
		if (!v || PyDict_SetItemString(d, names[i], v) < 0) {
			Py_XDECREF(v);
			Py_DECREF(d);
			return -1;
		}
		Py_DECREF(v);
	}
	return PyModule_AddObject(m, name, d);
}

PyMODINIT_FUNC PyInit__core(void)
{
	if (PyType_Ready(&TableType) < 0 || PyType_Ready(&BlockType) < 0)
		return NULL;
	PyObject *m = PyModule_Create(&core_module);
	if (!m)
		return NULL;
	Py_INCREF(&TableType);
	if (PyModule_AddObject(m, "Table", (PyObject *)&TableType) < 0)
		goto fail;
	/* The byte layouts this module reads and writes, for tests/unit/test_core.py to hold against the
	 * numpy dtypes. */
	static const char *const rec_names[] = {"key", "packets", "octets", "first_ms", "last_ms", "tcp_flags",
						"tos", "min_ttl", "max_ttl", "end_reason", "first_flags"};
	static const size_t rec_offsets[] = {
		offsetof(rec_t, key), offsetof(rec_t, packets), offsetof(rec_t, octets), offsetof(rec_t, first_ms),
		offsetof(rec_t, last_ms), offsetof(rec_t, tcp_flags), offsetof(rec_t, tos), offsetof(rec_t, min_ttl),
		offsetof(rec_t, max_ttl), offsetof(rec_t, end_reason), offsetof(rec_t, first_flags)};
	static const char *const slot_names[] = {"key", "packets", "octets", "first_seen", "last_seen", "tcp_flags",
						 "tos", "min_ttl", "max_ttl", "first_flags"};
	static const size_t slot_offsets[] = {
		offsetof(slot_t, key), offsetof(slot_t, packets), offsetof(slot_t, octets),
		offsetof(slot_t, first_seen), offsetof(slot_t, last_seen), offsetof(slot_t, tcp_flags),
		offsetof(slot_t, tos), offsetof(slot_t, min_ttl), offsetof(slot_t, max_ttl),
		offsetof(slot_t, first_flags)};
	if (add_layout(m, "RECORD_OFFSETS", rec_offsets, rec_names, 11) < 0 ||
	    add_layout(m, "SLOT_OFFSETS", slot_offsets, slot_names, 10) < 0 ||
	    PyModule_AddIntConstant(m, "RECORD_SIZE", sizeof(rec_t)) < 0 ||
	    PyModule_AddIntConstant(m, "SLOT_SIZE", sizeof(slot_t)) < 0)
		goto fail;
	return m;
fail:
	Py_DECREF(m);
	return NULL;
}
