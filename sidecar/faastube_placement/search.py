"""Search for the cheapest feasible assignment of functions to locations.

This module knows nothing of workflows or topologies: a ``Problem`` is integers and
floats (domains, demands, capacities, a seconds-per-byte matrix), so the search can be
tested and timed on its own. The problem is a capacitated quadratic assignment, NP-hard
in general, so the search is in two phases:

1. *Heuristic.* Greedy construction (heaviest function first, each next function the
   one with most bytes to those already placed, put where it adds least time), from
   several seeds that are distinct under the cluster's symmetries, plus a
   memory-first packing start; each start is improved by local search over moves,
   swaps of two functions, and swaps of the whole contents of two GPUs (a co-located
   group moves together, which single moves cannot do without a detour through worse
   layouts).
2. *Exact.* Depth-first branch and bound from the heuristic's cost, within a
   deterministic work budget (counted candidate evaluations, never wall-clock time, so
   the same input always gives the same output). The bound adds, for each unplaced
   function, its cheapest feasible spot against its placed neighbours. Symmetric
   choices are pruned: of two interchangeable empty GPUs of a node, or two
   interchangeable empty nodes, only the lower one is tried. When the search finishes,
   the result is optimal and its lower bound equals its cost.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

# Relative improvement below which a change is not worth making (float noise).
_EPS = 1e-12
# Seeds for the greedy phase; more rarely helps once local search has run.
MAX_STARTS = 8
# Default work budget of the exact phase, in candidate evaluations.
DEFAULT_EXACT_BUDGET = 20_000
UNLIMITED = 1 << 62


@dataclass(frozen=True)
class Problem:
    """A placement instance, by index.

    Functions and locations are numbered; hosts get a capacity no demand reaches.
    ``seconds_per_byte`` must be finite (callers map unreachable pairs to a huge value).
    """

    domains: tuple[tuple[int, ...], ...]           # function -> allowed locations, ascending
    demand_memory_bytes: tuple[int, ...]            # function -> bytes it needs on its location
    demand_slots: tuple[int, ...]                   # function -> sharing slots it needs
    capacity_memory_bytes: tuple[int, ...]          # location -> bytes free for placement
    capacity_slots: tuple[int, ...]                 # location -> slots free for placement
    edges: tuple[tuple[int, int, int], ...]         # (source function, target function, bytes)
    seconds_per_byte: tuple[tuple[float, ...], ...]
    latency_s: tuple[tuple[float, ...], ...]
    node_of: tuple[int, ...]                        # location -> node index
    node_locations: tuple[tuple[int, ...], ...]     # node -> its locations, ascending

    @property
    def function_count(self) -> int:
        return len(self.domains)

    @property
    def location_count(self) -> int:
        return len(self.capacity_slots)


@dataclass(frozen=True)
class Solution:
    assignment: tuple[int, ...]   # function -> location
    cost_s: float
    lower_bound_s: float
    proven_optimal: bool


@dataclass(frozen=True)
class Symmetry:
    """Interchangeable locations: the generators the search prunes with."""

    gpu_twins: tuple[tuple[int, ...], ...]   # location -> lower locations it may swap with
    node_twins: tuple[tuple[int, ...], ...]  # node -> lower nodes it may swap with (by offset)


def assignment_cost(problem: Problem, assignment: Sequence[int]) -> float:
    spb, lat = problem.seconds_per_byte, problem.latency_s
    total = 0.0
    for f, g, size in problem.edges:
        s, t = assignment[f], assignment[g]
        if s != t:
            total += size * spb[s][t] + lat[s][t]
    return total


def is_feasible(problem: Problem, assignment: Sequence[int]) -> bool:
    memory = [0] * problem.location_count
    slots = [0] * problem.location_count
    for f, loc in enumerate(assignment):
        if loc not in problem.domains[f]:
            return False
        memory[loc] += problem.demand_memory_bytes[f]
        slots[loc] += problem.demand_slots[f]
    return all(memory[loc] <= problem.capacity_memory_bytes[loc]
               and slots[loc] <= problem.capacity_slots[loc]
               for loc in range(problem.location_count))


# --- symmetry -------------------------------------------------------------------------


def find_symmetry(problem: Problem) -> Symmetry:
    """Transpositions of two GPUs of a node, and swaps of two whole nodes, that change
    no cost, capacity or domain: the generators the search prunes with."""
    n_loc = problem.location_count
    costs = np.stack([np.array(problem.seconds_per_byte, dtype=float).reshape(n_loc, n_loc),
                      np.array(problem.latency_s, dtype=float).reshape(n_loc, n_loc)])
    # Which functions may use each location, and what it offers: both must match.
    offer = [(problem.capacity_memory_bytes[loc], problem.capacity_slots[loc],
              frozenset(f for f, domain in enumerate(problem.domains) if loc in domain))
             for loc in range(n_loc)]

    def preserved(perm: list[int]) -> bool:
        index = np.array(perm)
        return all(offer[i] == offer[perm[i]] for i in range(n_loc) if perm[i] != i) and \
            bool(np.array_equal(costs[:, index][:, :, index], costs))

    twins: list[list[int]] = [[] for _ in range(n_loc)]
    for locs in problem.node_locations:
        for i, b in enumerate(locs):
            for a in locs[:i]:
                if offer[a] != offer[b]:
                    continue
                perm = list(range(n_loc))
                perm[a], perm[b] = b, a
                if preserved(perm):
                    twins[b].append(a)

    node_twins: list[list[int]] = [[] for _ in problem.node_locations]
    for v, v_locs in enumerate(problem.node_locations):
        for u in range(v):
            u_locs = problem.node_locations[u]
            if len(u_locs) != len(v_locs):
                continue
            perm = list(range(n_loc))
            for a, b in zip(u_locs, v_locs):
                perm[a], perm[b] = b, a
            if preserved(perm):
                node_twins[v].append(u)
    return Symmetry(tuple(tuple(t) for t in twins), tuple(tuple(t) for t in node_twins))


def orbit_representatives(problem: Problem, symmetry: Symmetry, locations: Sequence[int]) -> list[int]:
    """The lowest location of each orbit among ``locations`` (nothing placed yet)."""
    parent = list(range(problem.location_count))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    for b, lower in enumerate(symmetry.gpu_twins):
        for a in lower:
            union(a, b)
    for v, lower in enumerate(symmetry.node_twins):
        for u in lower:
            for a, b in zip(problem.node_locations[u], problem.node_locations[v]):
                union(a, b)
    seen: set[int] = set()
    out: list[int] = []
    for loc in sorted(locations):
        root = find(loc)
        if root not in seen:
            seen.add(root)
            out.append(loc)
    return out


# --- heuristic ------------------------------------------------------------------------


class _State:
    """A complete or partial assignment with incremental capacity bookkeeping."""

    def __init__(self, problem: Problem, adjacency: list[list[tuple[int, int, bool]]]) -> None:
        self.p = problem
        self.adj = adjacency
        self.assign = [-1] * problem.function_count
        self.memory = [0] * problem.location_count
        self.slots = [0] * problem.location_count
        self.members: list[list[int]] = [[] for _ in range(problem.location_count)]
        self.node_load = [0] * len(problem.node_locations)

    def fits(self, f: int, loc: int) -> bool:
        p = self.p
        return (self.memory[loc] + p.demand_memory_bytes[f] <= p.capacity_memory_bytes[loc]
                and self.slots[loc] + p.demand_slots[f] <= p.capacity_slots[loc])

    def place(self, f: int, loc: int) -> None:
        self.assign[f] = loc
        self.memory[loc] += self.p.demand_memory_bytes[f]
        self.slots[loc] += self.p.demand_slots[f]
        self.members[loc].append(f)
        self.node_load[self.p.node_of[loc]] += 1

    def unplace(self, f: int) -> None:
        loc = self.assign[f]
        self.assign[f] = -1
        self.memory[loc] -= self.p.demand_memory_bytes[f]
        self.slots[loc] -= self.p.demand_slots[f]
        self.members[loc].remove(f)
        self.node_load[self.p.node_of[loc]] -= 1

    def contribution(self, f: int, loc: int) -> float:
        """Seconds of f's edges to placed neighbours if f sat at ``loc``."""
        spb, lat, assign = self.p.seconds_per_byte, self.p.latency_s, self.assign
        total = 0.0
        for g, size, outgoing in self.adj[f]:
            m = assign[g]
            if m < 0 or m == loc:
                continue
            if outgoing:
                total += size * spb[loc][m] + lat[loc][m]
            else:
                total += size * spb[m][loc] + lat[m][loc]
        return total

    def group_cost(self, group: Sequence[int]) -> float:
        """Seconds of every edge touching ``group``, each counted once."""
        spb, lat, assign = self.p.seconds_per_byte, self.p.latency_s, self.assign
        inside = set(group)
        total = 0.0
        for f in group:
            s = assign[f]
            for g, size, outgoing in self.adj[f]:
                if g in inside and not outgoing:
                    continue  # counted from its source
                t = assign[g]
                if s == t:
                    continue
                total += size * spb[s][t] + lat[s][t] if outgoing else size * spb[t][s] + lat[t][s]
        return total


def _adjacency(problem: Problem) -> list[list[tuple[int, int, bool]]]:
    adj: list[list[tuple[int, int, bool]]] = [[] for _ in range(problem.function_count)]
    for f, g, size in problem.edges:
        adj[f].append((g, size, True))
        adj[g].append((f, size, False))
    return adj


def _weights(problem: Problem) -> list[int]:
    weight = [0] * problem.function_count
    for f, g, size in problem.edges:
        weight[f] += size
        weight[g] += size
    return weight


def _connectivity_order(problem: Problem, first: int, weight: Sequence[int]) -> list[int]:
    """First, then repeatedly the function with most bytes to those already ordered."""
    n = problem.function_count
    linked = [0] * n
    done = [False] * n
    order: list[int] = []
    adj = _adjacency(problem)
    nxt = first
    while True:
        order.append(nxt)
        done[nxt] = True
        for g, size, _out in adj[nxt]:
            linked[g] += size
        if len(order) == n:
            return order
        nxt = max((f for f in range(n) if not done[f]),
                  key=lambda f: (linked[f], weight[f], -problem.demand_memory_bytes[f], -f))


def _greedy(problem: Problem, adj: list[list[tuple[int, int, bool]]], order: Sequence[int],
            seed_location: int | None, symmetry: Symmetry) -> _State | None:
    state = _State(problem, adj)
    for k, f in enumerate(order):
        if k == 0 and seed_location is not None:
            if not state.fits(f, seed_location):
                return None
            state.place(f, seed_location)
            continue
        best_loc, best_cost = -1, math.inf
        for loc in problem.domains[f]:
            if state.fits(f, loc) and not _duplicate_empty(state, symmetry, loc):
                cost = state.contribution(f, loc)
                if cost < best_cost - _EPS * abs(best_cost if best_cost < math.inf else 0.0):
                    best_loc, best_cost = loc, cost
        if best_loc < 0:
            if not _place_by_ejection(state, f):
                return None
            continue
        state.place(f, best_loc)
    return state


def _partial_cost(state: _State) -> float:
    spb, lat, assign = state.p.seconds_per_byte, state.p.latency_s, state.assign
    total = 0.0
    for f, g, size in state.p.edges:
        s, t = assign[f], assign[g]
        if s >= 0 and t >= 0 and s != t:
            total += size * spb[s][t] + lat[s][t]
    return total


def _place_by_ejection(state: _State, f: int) -> bool:
    """Make room for ``f`` by moving one placed function elsewhere; the cheapest such
    repair wins. Greedy order can fill the GPU a big function needed with small ones."""
    p = state.p
    best: tuple[float, int, int, int] | None = None  # cost, loc for f, ejected g, its new loc
    for loc in p.domains[f]:
        for g in list(state.members[loc]):
            state.unplace(g)
            if state.fits(f, loc):
                state.place(f, loc)
                for other in p.domains[g]:
                    if other != loc and state.fits(g, other):
                        state.place(g, other)
                        cost = _partial_cost(state)
                        state.unplace(g)
                        if best is None or cost < best[0]:
                            best = (cost, loc, g, other)
                state.unplace(f)
            state.place(g, loc)
    if best is None:
        return False
    _cost, loc, g, other = best
    state.unplace(g)
    state.place(f, loc)
    state.place(g, other)
    return True


def _packing_start(problem: Problem, adj: list[list[tuple[int, int, bool]]]) -> _State | None:
    """First-fit decreasing by memory: a feasible start when memory is tight."""
    state = _State(problem, adj)
    order = sorted(range(problem.function_count),
                   key=lambda f: (-problem.demand_memory_bytes[f], -problem.demand_slots[f], f))
    for f in order:
        loc = next((loc for loc in problem.domains[f] if state.fits(f, loc)), -1)
        if loc < 0:
            return None
        state.place(f, loc)
    return state


def _improves(delta: float, base: float) -> bool:
    return delta < -_EPS * max(1e-30, abs(base))


def _local_search(state: _State, total: float, domain_sets: Sequence[frozenset[int]],
                  symmetry: Symmetry) -> float:
    """Moves, pair swaps and GPU-content swaps until none improves; returns the new cost."""
    p = state.p
    n = p.function_count
    improved = True
    while improved:
        improved = False
        # 1. Move one function to its best spot.
        for f in range(n):
            cur = state.assign[f]
            base = state.contribution(f, cur)
            state.unplace(f)
            best_loc, best_delta = cur, 0.0
            for loc in p.domains[f]:
                if loc != cur and state.fits(f, loc) and not _duplicate_empty(state, symmetry, loc):
                    delta = state.contribution(f, loc) - base
                    if delta < best_delta and _improves(delta, total):
                        best_loc, best_delta = loc, delta
            state.place(f, best_loc)
            if best_loc != cur:
                total += best_delta
                improved = True
        # 2. Swap two functions on different locations.
        for f in range(n):
            for g in range(f + 1, n):
                lf, lg = state.assign[f], state.assign[g]
                if lf == lg or lg not in domain_sets[f] or lf not in domain_sets[g]:
                    continue
                before = state.group_cost((f, g))
                state.unplace(f)
                state.unplace(g)
                if state.fits(f, lg) and state.fits(g, lf):
                    state.place(f, lg)
                    state.place(g, lf)
                    delta = state.group_cost((f, g)) - before
                    if _improves(delta, total):
                        total += delta
                        improved = True
                        continue
                    state.unplace(f)
                    state.unplace(g)
                state.place(f, lf)
                state.place(g, lg)
        # 3. Exchange the whole contents of a used location with another location.
        for a in range(p.location_count):
            if not state.members[a]:
                continue
            for b in range(p.location_count):
                if b == a or (state.members[b] and b < a) or _duplicate_empty(state, symmetry, b):
                    continue
                exchange = _exchange_delta(state, a, b, domain_sets)
                if exchange is not None and _improves(exchange, total):
                    group_a, group_b = list(state.members[a]), list(state.members[b])
                    _relocate(state, group_a, b)
                    _relocate(state, group_b, a)
                    total += exchange
                    improved = True
                    if not state.members[a]:
                        break
    return total


def _duplicate_empty(state: _State, symmetry: Symmetry, loc: int) -> bool:
    """True if ``loc`` is empty and an interchangeable lower location is empty too."""
    if state.members[loc]:
        return False
    if any(not state.members[twin] for twin in symmetry.gpu_twins[loc]):
        return True
    v = state.p.node_of[loc]
    return state.node_load[v] == 0 and any(state.node_load[u] == 0 for u in symmetry.node_twins[v])


def _exchange_delta(state: _State, a: int, b: int,
                    domain_sets: Sequence[frozenset[int]]) -> float | None:
    """Change in cost if the contents of ``a`` and ``b`` traded places; None if they can't."""
    p = state.p
    group_a, group_b = state.members[a], state.members[b]
    if any(b not in domain_sets[f] for f in group_a) or any(a not in domain_sets[f] for f in group_b):
        return None
    if (state.memory[a] > p.capacity_memory_bytes[b] or state.slots[a] > p.capacity_slots[b]
            or state.memory[b] > p.capacity_memory_bytes[a] or state.slots[b] > p.capacity_slots[a]):
        return None
    moved = dict.fromkeys(group_a, b)
    moved.update(dict.fromkeys(group_b, a))
    spb, lat, assign = p.seconds_per_byte, p.latency_s, state.assign
    delta = 0.0
    for f, f_new in moved.items():
        f_old = assign[f]
        for g, size, outgoing in state.adj[f]:
            if not outgoing and g in moved:
                continue  # counted from its source
            g_old = assign[g]
            g_new = moved.get(g, g_old)
            s_old, t_old, s_new, t_new = (f_old, g_old, f_new, g_new) if outgoing else \
                (g_old, f_old, g_new, f_new)
            if s_new != t_new:
                delta += size * spb[s_new][t_new] + lat[s_new][t_new]
            if s_old != t_old:
                delta -= size * spb[s_old][t_old] + lat[s_old][t_old]
    return delta


def _relocate(state: _State, group: Sequence[int], loc: int) -> None:
    for f in group:
        state.unplace(f)
    for f in group:
        state.place(f, loc)


def _spread_by_node(problem: Problem, locations: Sequence[int]) -> list[int]:
    """Round-robin over nodes: the first seed of every node before any node's second.

    On a mixed cluster the best layout usually fills one node; seeds that all sit on the
    first node would never find it when that node is the wrong one.
    """
    per_node: dict[int, list[int]] = {}
    for loc in locations:
        per_node.setdefault(problem.node_of[loc], []).append(loc)
    out: list[int] = []
    rank = 0
    while len(out) < len(locations):
        for node in sorted(per_node):
            if rank < len(per_node[node]):
                out.append(per_node[node][rank])
        rank += 1
    return out


def heuristic(problem: Problem, *, symmetry: Symmetry | None = None,
              max_starts: int = MAX_STARTS) -> tuple[tuple[int, ...], float] | None:
    """Best assignment found by greedy starts plus local search, or None if none fits."""
    n = problem.function_count
    if n == 0:
        return (), 0.0
    symmetry = symmetry or find_symmetry(problem)
    adj = _adjacency(problem)
    weight = _weights(problem)
    domain_sets = [frozenset(d) for d in problem.domains]
    first = max(range(n), key=lambda f: (weight[f], problem.demand_memory_bytes[f], -f))
    order = _connectivity_order(problem, first, weight)
    seeds = _spread_by_node(problem, orbit_representatives(problem, symmetry, problem.domains[first]))
    seeds = seeds[:max_starts]
    starts: list[_State] = []
    for seed in seeds:
        state = _greedy(problem, adj, order, seed, symmetry)
        if state is not None:
            starts.append(state)
    packed = _packing_start(problem, adj)
    if packed is not None:
        starts.append(packed)
    best: tuple[tuple[int, ...], float] | None = None
    for state in starts:
        _local_search(state, assignment_cost(problem, state.assign), domain_sets, symmetry)
        cost = assignment_cost(problem, state.assign)  # exact, free of accumulated rounding
        if best is None or cost < best[1] - _EPS * abs(best[1]):
            best = (tuple(state.assign), cost)
    logger.debug("heuristic: %d starts, best %s", len(starts), best and best[1])
    return best


# --- exact ----------------------------------------------------------------------------


def _edge_minimum(problem: Problem, f: int, g: int, size: int) -> float:
    """Cheapest the edge f -> g can ever be, ignoring other functions."""
    spb, lat = problem.seconds_per_byte, problem.latency_s
    best = math.inf
    for s in problem.domains[f]:
        for t in problem.domains[g]:
            if s == t:
                fits = (problem.demand_memory_bytes[f] + problem.demand_memory_bytes[g]
                        <= problem.capacity_memory_bytes[s]
                        and problem.demand_slots[f] + problem.demand_slots[g] <= problem.capacity_slots[s])
                if fits:
                    return 0.0
                continue
            best = min(best, size * spb[s][t] + lat[s][t])
    return best


def root_lower_bound(problem: Problem) -> float:
    return sum(_edge_minimum(problem, f, g, size) for f, g, size in problem.edges)


def branch_and_bound(problem: Problem, *, incumbent: tuple[tuple[int, ...], float] | None,
                     budget: int, symmetry: Symmetry | None = None) -> Solution | None:
    """Exact search from ``incumbent``; ``proven_optimal`` is False if the budget ran out."""
    n = problem.function_count
    root = root_lower_bound(problem) if problem.edges else 0.0
    if n == 0:
        return Solution((), 0.0, 0.0, True)
    symmetry = symmetry or find_symmetry(problem)
    adj = _adjacency(problem)
    weight = _weights(problem)
    first = max(range(n), key=lambda f: (weight[f], problem.demand_memory_bytes[f], -f))
    order = _connectivity_order(problem, first, weight)
    position = [0] * n
    for k, f in enumerate(order):
        position[f] = k
    # Edges whose both ends are still open at depth k contribute their static minimum.
    open_min = [0.0] * (n + 1)
    edge_min = [_edge_minimum(problem, f, g, size) for f, g, size in problem.edges]
    for (f, g, _size), low in zip(problem.edges, edge_min):
        for k in range(min(position[f], position[g]) + 1):
            open_min[k] += low
    state = _State(problem, adj)
    best_assign = list(incumbent[0]) if incumbent else None
    best_cost = incumbent[1] if incumbent else math.inf
    work = 0
    exhausted = False

    def pruned(cost: float) -> bool:
        return cost >= best_cost - _EPS * abs(best_cost) if best_cost < math.inf else False

    def bound_open(depth: int) -> float:
        nonlocal work
        total = open_min[depth]
        for f in order[depth:]:
            if not any(state.assign[g] >= 0 for g, _s, _o in adj[f]):
                continue
            cheapest = math.inf
            for loc in problem.domains[f]:
                if state.fits(f, loc):
                    cheapest = min(cheapest, state.contribution(f, loc))
            work += len(problem.domains[f])
            total += cheapest
            if total == math.inf:
                break
        return total

    def visit(depth: int, cost: float) -> None:
        nonlocal best_cost, best_assign, work, exhausted
        if depth == n:
            if best_cost == math.inf or cost < best_cost - _EPS * abs(best_cost):
                best_cost, best_assign = cost, list(state.assign)
            return
        if work > budget:
            exhausted = True
            return
        f = order[depth]
        candidates: list[tuple[float, int]] = []
        for loc in problem.domains[f]:
            if state.fits(f, loc) and not _duplicate_empty(state, symmetry, loc):
                candidates.append((state.contribution(f, loc), loc))
        work += len(problem.domains[f])
        candidates.sort()
        for added, loc in candidates:
            if pruned(cost + added + open_min[depth + 1]):
                break  # sorted: the rest add at least as much
            state.place(f, loc)
            if not pruned(cost + added + bound_open(depth + 1)):
                visit(depth + 1, cost + added)
            state.unplace(f)
            if exhausted:
                return

    visit(0, 0.0)
    if best_assign is None:
        return None
    final = assignment_cost(problem, best_assign)
    proven = not exhausted
    logger.debug("branch and bound: work %d, cost %s, proven %s", work, final, proven)
    return Solution(tuple(best_assign), final, final if proven else min(root, final), proven)


def solve(problem: Problem, *, exact_budget: int = DEFAULT_EXACT_BUDGET) -> Solution | None:
    """Heuristic, then exact search within ``exact_budget``; None if nothing fits."""
    symmetry = find_symmetry(problem)
    found = heuristic(problem, symmetry=symmetry)
    if exact_budget <= 0:
        if found is None:
            return None
        bound = root_lower_bound(problem)
        return Solution(found[0], found[1], min(bound, found[1]), found[1] <= bound)
    return branch_and_bound(problem, incumbent=found, budget=exact_budget, symmetry=symmetry)


def enumerate_all(problem: Problem, *, max_assignments: int) -> Solution | None:
    """Exhaustive search over every assignment, no pruning: the reference for tests."""
    import itertools

    size = 1
    for domain in problem.domains:
        size *= max(1, len(domain))
        if size > max_assignments:
            raise ValueError(f"{size}+ assignments exceed max_assignments={max_assignments}")
    best: tuple[int, ...] | None = None
    best_cost = math.inf
    for candidate in itertools.product(*problem.domains):
        if not is_feasible(problem, candidate):
            continue
        cost = assignment_cost(problem, candidate)
        if cost < best_cost:
            best, best_cost = candidate, cost
    if best is None:
        return None
    return Solution(best, best_cost, best_cost, True)
