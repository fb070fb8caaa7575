"""Front doors: each translates one wire format to the decision core and back.

* :mod:`proxy.doors.inline`: the reverse proxy (decides, then forwards);
* :mod:`proxy.doors.decisions`: ``POST /verify``, Envoy ext_authz and
  forward auth on the decision listener (decides; the caller or the data
  plane acts).

A door reads and bounds its input, calls :class:`proxy.core.DecisionCore`,
answers, and resolves the decision's claim. It never runs a stage itself.
"""
