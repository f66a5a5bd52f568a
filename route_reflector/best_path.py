"""Best path among the routes for one prefix: RFC 4271 §9.1.2.2 as amended by RFC 4456 §9.

Every peer of a reflector is internal (same AS), so two steps of RFC 4271 have nothing to
decide and are left out: eBGP over iBGP (d) and the interior cost to the next hop (e: Pipit
runs no IGP, every next hop costs the same). What remains, in order:

1. highest LOCAL_PREF (absent: 100);
2. shortest AS_PATH (the number of AS numbers: Pipit's paths are plain sequences);
3. lowest ORIGIN (igp < egp < incomplete);
4. lowest MULTI_EXIT_DISC (absent: 0), compared only between routes from the same
   neighbouring AS (the first AS of the path; an empty path is our own AS), unless
   `always_compare_med`;
5. lowest ORIGINATOR_ID, or the peer's BGP identifier for a route without one (RFC 4456);
6. shortest CLUSTER_LIST (RFC 4456);
7. lowest peer address.

Step 4 is not a total order (A beats B on MED, B beats C on router id, C and A are from
different ASes), so it is done as the RFC writes it, by elimination over the whole set: the
result does not depend on the order the routes came in.
"""

from __future__ import annotations

from collections.abc import Collection

from route_reflector.route import ORIGINS, Route

DEFAULT_LOCAL_PREF = 100
ORIGIN_RANK = {origin: rank for rank, origin in enumerate(ORIGINS)}


def _first_steps(route: Route) -> tuple[int, int, int]:
    local_pref = DEFAULT_LOCAL_PREF if route.local_pref is None else route.local_pref
    return -local_pref, len(route.as_path), ORIGIN_RANK[route.origin]


def _med(route: Route) -> int:
    return route.med or 0


def _last_steps(route: Route) -> tuple[int, int, int]:
    return (int(route.originator_id or route.peer_router_id), len(route.cluster_list),
            int(route.peer))


def _lowest_med(routes: list[Route], always_compare_med: bool) -> list[Route]:
    if always_compare_med:
        lowest = min(map(_med, routes))
        return [r for r in routes if _med(r) == lowest]
    lowest_by_as: dict[int | None, int] = {}
    for route in routes:
        neighbour_as = route.as_path[0] if route.as_path else None
        med = _med(route)
        if med < lowest_by_as.get(neighbour_as, med + 1):
            lowest_by_as[neighbour_as] = med
    return [r for r in routes
            if _med(r) == lowest_by_as[r.as_path[0] if r.as_path else None]]


def best_path(routes: Collection[Route], always_compare_med: bool = False) -> Route:
    """The best of `routes` (one per peer, all for one prefix; not empty)."""
    if len(routes) == 1:
        return next(iter(routes))
    if not routes:
        raise ValueError("best_path needs at least one route")
    ranked = [(_first_steps(r), r) for r in routes]
    top = min(key for key, _ in ranked)
    candidates = [r for key, r in ranked if key == top]
    if len(candidates) > 1:
        candidates = _lowest_med(candidates, always_compare_med)
    return min(candidates, key=_last_steps)
