"""Objects frozen out of the garbage collector's walks (bgp_agent.long_lived), in a process of
their own (freezing is for a whole process): they are no longer walked, and one that loses its
last reference is still freed."""

import subprocess
import sys

SCRIPT = """
import gc, weakref
from bgp_agent import long_lived

class Route:
    pass

table = {n: Route() for n in range(20000)}
walked = len(gc.get_objects())
frozen = long_lived.freeze()
assert frozen >= 20000, frozen
assert len(gc.get_objects()) <= walked - 20000, (walked, len(gc.get_objects()))
freed = []
probe = weakref.ref(table[7], lambda _: freed.append(7))
del table[7]  # the last reference: freed at once, frozen or not
assert freed == [7] and probe() is None
print("ok")
"""


def test_frozen_objects_are_not_walked_and_are_still_freed():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "ok\n", result.stderr
