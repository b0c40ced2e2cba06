"""Compiled inner loops of the BitTorrent phase (numba): one request/grant pass over bit-packed have-state.

The BitTorrent phase is 90% of a round's stages and its decisions are per-candidate loops (draw a chunk,
test it against a few neighbours, keep the rarest), which numpy can only express as wide temporaries.
Here each receiver's loop runs in compiled code against two bit-packed copies of the have-matrix, so a
candidate costs a few cache-resident bit tests instead of a dozen gathers.

Bit layouts (uint64 words, little-endian bit order):
  hbits[v, c >> 6] bit (c & 63): peer v holds chunk c        (peer-major, a receiver's own row)
  tbits[c, w >> 6] bit (w & 63): chunk c is held by peer w   (chunk-major, a chunk's holders)

Randomness is the same counter-based hash as `rng.hash_keys` (splitmix64 chained over the keys), keyed by
(seed, BT, stage, pass, peer, ...), so a decision of peer v depends only on v's keys and its own and its
neighbours' rows, as in a real decentralised swarm.
"""

from __future__ import annotations

import numpy as np
from numba import get_thread_id, njit, prange

from . import rng

_SEED0 = rng.SEED0
_INV53 = 1.0 / 9007199254740992.0
_mix = njit(cache=True, inline="always")(rng.mix)  # the schedule's one mixer, compiled


@njit(cache=True, inline="always")
def _h(base, a, b):
    """hash_keys(*prefix, a, b) given base = the chained hash of the prefix."""
    return _mix(_mix(base ^ np.uint64(a)) ^ np.uint64(b))


@njit(cache=True, inline="always")
def _unif(x):
    return float(x >> np.uint64(11)) * _INV53


@njit(cache=True)
def key_base(seed, tag, stage, p):
    """Chained hash of the key prefix (seed, tag, stage, pass)."""
    h = _SEED0
    h = _mix(h ^ np.uint64(seed))
    h = _mix(h ^ np.uint64(tag))
    h = _mix(h ^ np.uint64(stage))
    return _mix(h ^ np.uint64(p))


@njit(cache=True)
def _gcd(a, b):
    while b:
        a, b = b, a % b
    return a


@njit(cache=True, inline="always")
def _log2(x):
    """Index of the single set bit of a power of two."""
    return np.int64(np.log2(float(x)))


@njit(cache=True, inline="always")
def _bit(bits, row, col):
    return (bits[row, col >> 6] >> np.uint64(col & 63)) & np.uint64(1)


@njit(cache=True)
def apply_delivered(have, have_t, hbits, tbits, held, holders, recip, nbr, s, r, c, counted):
    """Apply a stage's delivered transfers to every copy of the have-state, or change nothing.

    Returns 0, or 1 if a receiver already held the chunk, or 2 if one chunk reaches one peer twice.
    `counted[i]` says whether transfer i counts toward reciprocity (not spray): recip[v, j] is what v got
    from its j-th neighbour.
    """
    m = r.size
    for i in range(m):
        if _bit(hbits, r[i], c[i]):
            return 1
    for i in range(m):
        word = c[i] >> 6
        bit = np.uint64(1) << np.uint64(c[i] & 63)
        if hbits[r[i], word] & bit:  # set earlier in this loop: a duplicate within the stage; undo
            for z in range(i):
                hbits[r[z], c[z] >> 6] &= ~(np.uint64(1) << np.uint64(c[z] & 63))
            return 2
        hbits[r[i], word] |= bit
    D = nbr.shape[1]
    for i in range(m):
        v, ch = r[i], c[i]
        have[v, ch] = True
        have_t[ch, v] = True
        tbits[ch, v >> 6] |= np.uint64(1) << np.uint64(v & 63)
        held[v] += 1
        holders[ch] += 1
        if counted[i]:
            for j in range(D):
                if nbr[v, j] == s[i]:
                    recip[v, j] += 1
                    break
    return 0


@njit(cache=True)
def pack_rows(have):
    """Bit-pack a bool matrix row-wise."""
    rows, cols = have.shape
    out = np.zeros((rows, (cols + 63) >> 6), dtype=np.uint64)
    for i in range(rows):
        for j in range(cols):
            if have[i, j]:
                out[i, j >> 6] |= np.uint64(1) << np.uint64(j & 63)
    return out


@njit(cache=True)
def book(lists, lengths, rows, vals):
    """Append vals[i] to the per-row list of rows[i] (per-stage sent lists)."""
    for i in range(rows.size):
        lists[rows[i], lengths[rows[i]]] = vals[i]
        lengths[rows[i]] += 1


@njit(cache=True)
def set_pending(pbits, r, c, on):
    """Set (on) or clear the scheduled-this-stage bits of (r[i], c[i])."""
    for i in range(r.size):
        b = np.uint64(1) << np.uint64(c[i] & 63)
        if on:
            pbits[r[i], c[i] >> 6] |= b
        else:
            pbits[r[i], c[i] >> 6] &= ~b


@njit(cache=True)
def reverse_slots(nbr, n):
    """rev[v, j] = position of v in the row of its j-th neighbour (0 for padding)."""
    rows, D = nbr.shape
    rev = np.zeros((rows, D), dtype=np.int64)
    for v in range(rows):
        for j in range(D):
            w = nbr[v, j]
            if w >= n:
                continue
            for i in range(D):
                if nbr[w, i] == v:
                    rev[v, j] = i
                    break
    return rev


@njit(cache=True)
def _bt_requests(
    i,
    o0,
    base,
    N,
    n,
    nbr,
    recv,
    want,
    miss,
    endgame,
    hbits,
    tbits,
    can_send,
    up_left,
    choked,
    pbits,
    oversample,
    max_draws,
    q_s,
    q_r,
    q_c,
    q_j,
    q_g,
):
    """Receiver recv[i]'s requests of one pass, written at q_*[o0:]; returns (count, draws, feasible)."""
    D = nbr.shape[1]
    W = hbits.shape[1]
    tail = N & 63
    last_mask = (np.uint64(1) << np.uint64(tail)) - np.uint64(1) if tail else ~np.uint64(0)
    cand_c = np.empty(64, dtype=np.int64)
    cand_k = np.empty(64, dtype=np.float64)
    fj = np.empty(D, dtype=np.int64)  # v's neighbour slots that may serve now
    nq = 0
    st0 = 0
    st1 = 0
    v = recv[i]
    eg = endgame[i]
    nf = 0
    for j in range(D):
        w = nbr[v, j]
        if w >= n:
            break
        if can_send[w] and up_left[w] > 0 and not choked[v, j]:
            fj[nf] = j
            nf += 1
    if nf == 0:
        return 0, 0, 0
    # endgame: every missing chunk; otherwise oversample the request count, the rarest are requested
    limit = N if eg else int(np.ceil(oversample * want[i]))
    draws = W if eg else min(W, max_draws * limit + 16)
    if miss[i] < W:  # missing chunks are sparse among v's words: visit them all rather than come up short
        draws = W
    per_word = 1 + (2 * limit) // W  # candidates tried per word: spread over the chunk space
    vb = _mix(base ^ np.uint64(v))
    # visit v's have-words in a seeded permutation (o + t * stride mod W, stride coprime to W) and take
    # one random missing chunk of each (every one in endgame): no draw is wasted on a chunk v holds
    x0 = _mix(vb ^ np.uint64(0x9E37))
    o = np.int64(x0 % np.uint64(W))
    stride = np.int64((x0 >> np.uint64(32)) % np.uint64(W)) | 1
    while _gcd(stride, W) != 1:
        stride += 1
    pos = o
    found = 0
    for _t in range(draws):
        if found >= limit:
            break
        wd = pos
        pos += stride
        while pos >= W:
            pos -= W
        m = ~hbits[v, wd]
        if wd == W - 1:
            m &= last_mask
        if m == 0:
            continue
        # missing bits in cyclic order from a random one (from bit 0 in endgame, which takes them all)
        r = 0 if eg else np.int64(_mix(vb ^ np.uint64(wd) ^ np.uint64(0xB17)) & np.uint64(63))
        rot = ((m >> np.uint64(r)) | (m << np.uint64(64 - r))) if r else m
        tried = 0
        while rot != 0 and found < limit and (eg or tried < per_word):
            low = rot & (~rot + np.uint64(1))
            rot &= ~low
            c = wd * 64 + ((_log2(low) + r) & 63)
            tried += 1
            st0 += 1
            if _bit(pbits, v, c):  # already scheduled to v this stage
                continue
            cb = tbits[c]
            feas = 0
            for z in range(nf):
                w = nbr[v, fj[z]]
                feas += np.int64((cb[w >> 6] >> np.uint64(w & 63)) & np.uint64(1))
            if feas == 0:
                continue
            rar = 0
            for j in range(D):
                w = nbr[v, j]
                if w >= n:
                    break
                rar += np.int64((cb[w >> 6] >> np.uint64(w & 63)) & np.uint64(1))
            st1 += 1
            if found == cand_c.size:
                cand_c = np.concatenate((cand_c, np.empty(found, dtype=np.int64)))
                cand_k = np.concatenate((cand_k, np.empty(found, dtype=np.float64)))
            cand_c[found] = c
            cand_k[found] = rar + 0.5 * _unif(_mix(vb ^ np.uint64(c) ^ np.uint64(0x5A5A5A5A)))
            found += 1
    take = min(found, want[i])
    if take == 0:
        return 0, st0, st1
    order = np.argsort(cand_k[:found])
    for a in range(take):
        c = cand_c[order[a]]
        xb = _h(vb, c, 3)
        if eg:
            for j in range(D):
                w = nbr[v, j]
                if w >= n:
                    break
                if _bit(tbits, c, w) and can_send[w] and up_left[w] > 0 and not choked[v, j]:
                    q_s[nq + o0] = w
                    q_r[nq + o0] = v
                    q_c[nq + o0] = c
                    q_j[nq + o0] = j
                    q_g[nq + o0] = o0 + a
                    nq += 1
        else:
            o = np.int64(xb % np.uint64(D))
            for jj in range(D):
                j = (o + jj) % D
                w = nbr[v, j]
                if w < n and _bit(tbits, c, w) and can_send[w] and up_left[w] > 0 and not choked[v, j]:
                    q_s[nq + o0] = w
                    q_r[nq + o0] = v
                    q_c[nq + o0] = c
                    q_j[nq + o0] = j
                    q_g[nq + o0] = -1
                    nq += 1
                    break
    return nq, st0, st1


@njit(cache=True)
def _bt_grant(s, a, b, idx, sb, N, q_r, q_c, q_j, rev, recip, served, up_left, tau_left, prio, granted, deficit, mode):
    """Sender s grants its requests idx[a:b] in priority order within its upload budget and tau.

    Order: receivers already unchoked this stage, then (mode 0, "deficit") the receiver missing the most
    chunks (`deficit`, as it announced) or (mode 1, "reciprocity") the one s received most from, then chance.
    """
    if a == b:
        return
    for e in range(a, b):
        q = idx[e]
        sl = rev[q_r[q], q_j[q]]
        key = float(deficit[q_r[q]]) if mode == 0 else float(recip[s, sl])
        pr = key + _unif(_h(sb, s * N + q_c[q], 4))
        if served[s, sl]:
            pr += 1e12
        prio[e] = -pr
    order = np.argsort(prio[a:b])
    up = up_left[s]
    tau = tau_left[s]
    newpairs = np.empty(max(tau, 1), dtype=np.int64)
    nnew = 0
    for o in range(b - a):
        q = idx[a + order[o]]
        if up <= 0:
            break
        sl = rev[q_r[q], q_j[q]]
        ok = served[s, sl]
        if not ok:
            for z in range(nnew):
                if newpairs[z] == sl:
                    ok = True
                    break
        if not ok and nnew < tau:
            newpairs[nnew] = sl
            nnew += 1
            ok = True
        if ok:
            granted[q] = True
            up -= 1


@njit(cache=True, parallel=True)
def bt_pass(
    base,
    N,
    n,
    nbr,
    rev,
    recv,
    want,
    miss,
    endgame,
    hbits,
    tbits,
    can_send,
    up_left,
    down_left,
    tau_left,
    served,
    recip,
    choked,
    pbits,
    oversample,
    max_draws,
    grant_mode,
    stats,
):
    """One request/grant pass.  Returns (sender, receiver, chunk, slot) of the grants that survive.

    Receivers (in `recv`) draw candidate chunks they miss, keep those a non-choking neighbour with upload
    left can serve, and request the `want` rarest (rarity = holders among their neighbours), each from a
    random feasible holder, or in endgame from every feasible holder.  Senders grant in order of: pair
    already unchoked this stage, then the requester's missing count (`grant_mode` 0) or reciprocity
    (`recip`, mode 1), then chance, within upload budget and tau new receivers.  In endgame one grant per
    (receiver, chunk) survives.  Refused requests choke the pair for the rest of the stage.  Budgets,
    `served`, `pbits` (chunks scheduled to each receiver this stage, bit-packed like hbits) and `choked`
    are updated in place; `stats` counts draws, feasible candidates and requests.
    """
    D = nbr.shape[1]
    # ---- receivers, in parallel: each writes its requests into its own segment
    R = recv.size
    off = np.zeros(R + 1, dtype=np.int64)
    for i in range(R):
        off[i + 1] = off[i] + want[i] * (D if endgame[i] else 1)
    cap = off[R]
    q_s = np.empty(cap, dtype=np.int64)
    q_r = np.empty(cap, dtype=np.int64)
    q_c = np.empty(cap, dtype=np.int64)
    q_j = np.empty(cap, dtype=np.int64)
    q_g = np.empty(cap, dtype=np.int64)  # endgame group (receiver, chunk) id, -1 for normal requests
    cnt_r = np.zeros(R, dtype=np.int64)
    st0 = np.zeros(R, dtype=np.int64)
    st1 = np.zeros(R, dtype=np.int64)
    for i in prange(R):
        cnt_r[i], st0[i], st1[i] = _bt_requests(
            i,
            off[i],
            base,
            N,
            n,
            nbr,
            recv,
            want,
            miss,
            endgame,
            hbits,
            tbits,
            can_send,
            up_left,
            choked,
            pbits,
            oversample,
            max_draws,
            q_s,
            q_r,
            q_c,
            q_j,
            q_g,
        )
    # compact the segments (in receiver order, so the result does not depend on thread timing)
    nq = 0
    for i in range(R):
        for e in range(off[i], off[i] + cnt_r[i]):
            q_s[nq] = q_s[e]
            q_r[nq] = q_r[e]
            q_c[nq] = q_c[e]
            q_j[nq] = q_j[e]
            q_g[nq] = q_g[e]
            nq += 1
    stats[0] += st0.sum()
    stats[1] += st1.sum()
    ngroups = cap
    stats[2] += nq
    # ---- senders: bucket requests by sender, grant in priority order
    cnt = np.zeros(n + 1, dtype=np.int64)
    for q in range(nq):
        cnt[q_s[q]] += 1
    start = np.zeros(n + 2, dtype=np.int64)
    for s in range(n + 1):
        start[s + 1] = start[s] + cnt[s]
    fill = start[:-1].copy()
    idx = np.empty(nq, dtype=np.int64)
    for q in range(nq):
        s = q_s[q]
        idx[fill[s]] = q
        fill[s] += 1
    prio = np.empty(nq, dtype=np.float64)
    sb = _mix(base ^ np.uint64(0xC0FFEE))
    granted = np.zeros(nq, dtype=np.bool_)
    deficit = np.zeros(n + 1, dtype=np.int64)  # what each requester misses (a peer announces it with its asks)
    for i in range(R):
        deficit[recv[i]] = miss[i]
    # each sender grants from its own budget and requests only, so senders run in parallel too
    for s in prange(n + 1):
        _bt_grant(
            s,
            start[s],
            start[s + 1],
            idx,
            sb,
            N,
            q_r,
            q_c,
            q_j,
            rev,
            recip,
            served,
            up_left,
            tau_left,
            prio,
            granted,
            deficit,
            grant_mode,
        )
    # ---- endgame: one grant per (receiver, chunk) survives, chosen by chance
    keep = np.zeros(nq, dtype=np.bool_)
    if ngroups:
        best = np.full(ngroups, -1, dtype=np.int64)
        bestu = np.full(ngroups, 2.0)
        for q in range(nq):
            g = q_g[q]
            if g >= 0 and granted[q]:
                u = _unif(_h(sb, q_s[q] * N + q_c[q], 5))
                if u < bestu[g]:
                    bestu[g] = u
                    best[g] = q
        for g in range(ngroups):
            if best[g] >= 0:
                keep[best[g]] = True
    # ---- refusals choke the pair; survivors are committed
    m = 0
    for q in range(nq):
        if not granted[q]:
            choked[q_r[q], q_j[q]] = True
        elif q_g[q] < 0 or keep[q]:
            m += 1
    out_s = np.empty(m, dtype=np.int64)
    out_r = np.empty(m, dtype=np.int64)
    out_c = np.empty(m, dtype=np.int64)
    out_l = np.empty(m, dtype=np.int64)
    m = 0
    for q in range(nq):
        if granted[q] and (q_g[q] < 0 or keep[q]):
            s, r, c = q_s[q], q_r[q], q_c[q]
            sl = rev[r, q_j[q]]
            out_s[m] = s
            out_r[m] = r
            out_c[m] = c
            out_l[m] = sl
            m += 1
            up_left[s] -= 1
            down_left[r] -= 1
            if not served[s, sl]:
                served[s, sl] = True
                tau_left[s] -= 1
            pbits[r, c >> 6] |= np.uint64(1) << np.uint64(c & 63)
    return out_s, out_r, out_c, out_l


@njit(cache=True)
def _warm_requests(
    i,
    o0,
    stamp,
    mark,
    base,
    policy,
    n,
    N,
    K,
    k,
    nbr,
    recv,
    draws,
    hbits,
    tbits,
    rlist,
    rlen,
    win,
    own,
    gated,
    in_window,
    can_send,
    up_left,
    down_left,
    down,
    askers,
    share,
    received,
    pbits,
    sent,
    sent_len,
    q_s,
    q_r,
    q_c,
    q_j,
    q_p,
):
    """Receiver recv[i]'s requests of one warm-up pass, written at q_*[o0:]; returns (count, got, used)."""
    D = nbr.shape[1]
    Kd = max(K, 1)
    cand_c = np.empty(64, dtype=np.int64)
    cand_k = np.empty(64, dtype=np.float64)
    fj = np.empty(D, dtype=np.int64)
    nq = 0
    gi = 0
    ui = 0
    v = recv[i]
    vb = _mix(base ^ np.uint64(v))
    found = 0
    # draw from the neighbours that may still send this stage
    nf = 0
    # what v's neighbours can still upload to it: their upload split over the receivers asking them this
    # pass (`askers`), times `share` to cover neighbours whose other receivers ask for less
    fair = 0.0
    for j in range(D):
        w = nbr[v, j]
        if w >= n:
            break
        if can_send[w] and up_left[w] > 0:
            fj[nf] = w
            nf += 1
            fair += up_left[w] / max(askers[w], 1)
    if nf == 0:
        return 0, 0, 0
    want = min(down_left[v], np.int64(np.ceil(share * fair)))
    nd = min(draws[i], max(8, (draws[i] * want) // max(down_left[v], 1) + 1))
    enough = want + want // 2 + 1  # feasible candidates to choose the requests from
    for t in range(nd):
        if found >= enough:
            break
        ui += 1
        x = _mix(vb ^ np.uint64(t))
        w = fj[np.int64(x % np.uint64(nf))]
        total = rlen[w] + own[w]
        if total <= 0:
            continue
        pos = np.int64(_mix(x ^ np.uint64(1)) % np.uint64(total))
        if pos < rlen[w]:
            c = rlist[w, pos]
        elif gated:
            c = win[w, pos - rlen[w]]
        else:
            c = w * K + pos - rlen[w]
        if c < 0 or mark[c] == stamp or _bit(hbits, v, c) or _bit(pbits, v, c):
            continue
        mark[c] = stamp
        gi += 1
        # the neighbour it was drawn from holds it; test that one first
        if not _warm_can(w, c, c // Kd, tbits, gated, in_window, can_send, up_left, sent, sent_len):
            if not _warm_any_sender(v, c, n, Kd, nbr, tbits, gated, in_window, can_send, up_left, sent, sent_len):
                continue
        if found == cand_c.size:
            cand_c = np.concatenate((cand_c, np.empty(found, dtype=np.int64)))
            cand_k = np.concatenate((cand_k, np.empty(found, dtype=np.float64)))
        cand_c[found] = c
        cand_k[found] = _unif(_h(base, v * N + c, 2))
        found += 1
    take = min(found, want)
    if take == 0:
        return 0, gi, ui
    order = np.argsort(cand_k[:found])
    below = 1e9 if received[v] < k else 0.0
    for a in range(take):
        c = cand_c[order[a]]
        owner = c // Kd
        best = -1.0
        bj = -1
        for j in range(D):
            w = nbr[v, j]
            if w >= n:
                break
            if not _warm_can(w, c, owner, tbits, gated, in_window, can_send, up_left, sent, sent_len):
                continue
            sc = _unif(_h(base, v * (n + 1) + w, 3))
            if w != owner:
                sc += 1e9
            if policy == 0:
                sc += up_left[w] * 1e3
            if sc > best:
                best = sc
                bj = j
        jit = _unif(_h(base, v * N + c, 4))
        if policy == 2:
            pr = below + jit
        elif policy == 1:
            pr = below + down_left[v] * 1e3 + jit
        else:
            pr = below + max(k - received[v], 0) / down[v] * 1e3 + jit
        q_s[nq + o0] = nbr[v, bj]
        q_r[nq + o0] = v
        q_c[nq + o0] = c
        q_j[nq + o0] = bj
        q_p[nq + o0] = -pr
        nq += 1
    return nq, gi, ui


@njit(cache=True, parallel=True)
def warm_pass(
    base,
    policy,
    n,
    N,
    K,
    k,
    nbr,
    rev,
    recv,
    draws,
    hbits,
    tbits,
    rlist,
    rlen,
    win,
    own,
    gated,
    in_window,
    can_send,
    up_left,
    down_left,
    down,
    askers,
    share,
    tau_left,
    served,
    received,
    pbits,
    sent,
    sent_len,
    mark,
    stamp0,
):
    """One tracker pass of a warm-up stage (GreedyFastestFirst, RandomFastestFirst or RandomFIFO).

    Each receiver in `recv` draws `draws[i]` candidates origin-obliviously: a random neighbour, then a
    random entry of that neighbour's eligible buffer (its relay list, then its eligible own chunks `win`
    or all K).  Missing, unscheduled candidates that some neighbour may serve now (eligible under gating,
    lag over, upload left, not already sending that chunk this stage) are kept, at most the receiver's
    residual download, in seeded random order.  Each is assigned the best feasible sender: non-owner
    first, then (policy 0, GFF) most residual upload, then chance.  Senders accept in priority order, peers
    below k first, then (GFF) the requester with the longest time to k, (policy 1) the fastest requester,
    (policy 2) arrival by chance; within upload budget, tau new receivers and one send per chunk.
    Accepted transfers are committed to the budgets.  Returns (sender, receiver, chunk, slot, got, used,
    stamp): recv[i] found got[i] usable candidates in used[i] draws (their ratio sizes the next draw).
    """
    # ---- receivers, in parallel: each writes its requests into its own segment; candidate de-duplication
    # stamps live in one row of `mark` per thread, stamp0 + i + 1 for receiver i
    R = recv.size
    off = np.zeros(R + 1, dtype=np.int64)
    for i in range(R):
        off[i + 1] = off[i] + min(down_left[recv[i]], draws[i])
    cap = off[R]
    q_s = np.empty(cap, dtype=np.int64)
    q_r = np.empty(cap, dtype=np.int64)
    q_c = np.empty(cap, dtype=np.int64)
    q_j = np.empty(cap, dtype=np.int64)
    q_p = np.empty(cap, dtype=np.float64)
    cnt_r = np.zeros(R, dtype=np.int64)
    got = np.zeros(R, dtype=np.int64)
    used = np.zeros(R, dtype=np.int64)
    for i in prange(R):
        cnt_r[i], got[i], used[i] = _warm_requests(
            i,
            off[i],
            stamp0 + i + 1,
            mark[get_thread_id() % mark.shape[0]],
            base,
            policy,
            n,
            N,
            K,
            k,
            nbr,
            recv,
            draws,
            hbits,
            tbits,
            rlist,
            rlen,
            win,
            own,
            gated,
            in_window,
            can_send,
            up_left,
            down_left,
            down,
            askers,
            share,
            received,
            pbits,
            sent,
            sent_len,
            q_s,
            q_r,
            q_c,
            q_j,
            q_p,
        )
    stamp = stamp0 + R
    nq = 0
    for i in range(R):
        for e in range(off[i], off[i] + cnt_r[i]):
            q_s[nq] = q_s[e]
            q_r[nq] = q_r[e]
            q_c[nq] = q_c[e]
            q_j[nq] = q_j[e]
            q_p[nq] = q_p[e]
            nq += 1
    # senders: bucket by sender, accept in priority order, commit at once (no request is cancelled later)
    cnt = np.zeros(n + 2, dtype=np.int64)
    for q in range(nq):
        cnt[q_s[q] + 1] += 1
    for s in range(n + 1):
        cnt[s + 1] += cnt[s]
    fill = cnt[:-1].copy()
    idx = np.empty(nq, dtype=np.int64)
    for q in range(nq):
        idx[fill[q_s[q]]] = q
        fill[q_s[q]] += 1
    keys = np.empty(nq, dtype=np.float64)
    for e in range(nq):
        keys[e] = q_p[idx[e]]
    ok = np.zeros(nq, dtype=np.bool_)
    m = 0
    for s in range(n):
        a, b = cnt[s], cnt[s + 1]
        if a == b:
            continue
        order = np.argsort(keys[a:b])
        for o in range(b - a):
            if up_left[s] <= 0:
                break
            q = idx[a + order[o]]
            c = q_c[q]
            dup = False
            for z in range(sent_len[s]):
                if sent[s, z] == c:
                    dup = True
                    break
            if dup:
                continue
            r = q_r[q]
            sl = rev[r, q_j[q]]
            if not served[s, sl]:
                if tau_left[s] <= 0:
                    continue
                served[s, sl] = True
                tau_left[s] -= 1
            up_left[s] -= 1
            down_left[r] -= 1
            sent[s, sent_len[s]] = c
            sent_len[s] += 1
            pbits[r, c >> 6] |= np.uint64(1) << np.uint64(c & 63)
            ok[q] = True
            m += 1
    out_s = np.empty(m, dtype=np.int64)
    out_r = np.empty(m, dtype=np.int64)
    out_c = np.empty(m, dtype=np.int64)
    out_l = np.empty(m, dtype=np.int64)
    m = 0
    for q in range(nq):
        if ok[q]:
            out_s[m] = q_s[q]
            out_r[m] = q_r[q]
            out_c[m] = q_c[q]
            out_l[m] = rev[q_r[q], q_j[q]]
            m += 1
    return out_s, out_r, out_c, out_l, got, used, stamp


@njit(cache=True, inline="always")
def _warm_can(w, c, owner, tbits, gated, in_window, can_send, up_left, sent, sent_len):
    """Whether neighbour w may serve chunk c now (warm-up rules)."""
    if not can_send[w] or up_left[w] <= 0 or not _bit(tbits, c, w):
        return False
    if gated and w == owner and not in_window[c]:
        return False
    for z in range(sent_len[w]):
        if sent[w, z] == c:
            return False
    return True


@njit(cache=True, inline="always")
def _warm_any_sender(v, c, n, Kd, nbr, tbits, gated, in_window, can_send, up_left, sent, sent_len):
    owner = c // Kd
    for j in range(nbr.shape[1]):
        w = nbr[v, j]
        if w >= n:
            return False
        if _warm_can(w, c, owner, tbits, gated, in_window, can_send, up_left, sent, sent_len):
            return True
    return False


def compile_note() -> str | None:
    """A line to print before the first simulated round, or None when numba's on-disk cache is filled.

    Without the cache the first compiled call compiles every kernel first (about 30 s on 2 cores), which
    would otherwise look like a hang.
    """
    from pathlib import Path

    src = Path(__file__)
    index = list(src.with_name("__pycache__").glob("bt_kernel.*.nbi"))
    if index and max(f.stat().st_mtime for f in index) >= src.stat().st_mtime:
        return None  # filled since the source last changed (an older cache is stale: numba compiles again)
    return "compiling the swarm's numba kernels first (about 30 s, once; cached for later runs)"
