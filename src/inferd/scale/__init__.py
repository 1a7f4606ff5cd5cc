"""Scaling out: inferd's whole app as replicas under Ray Serve (``inferd serve --replicas N``).

Only ``ray_serve`` and ``router`` import Ray (the optional ``inferd[ray]`` extra); ``affinity`` and
``bridge`` are plain Python so the rest of inferd never needs it.
"""
