"""The dashboard: a web application over the store, for people who run a federation.

Server-rendered pages (runs and their comparison, a live run, agents, the audit trail, a
model's lineage, the aggregators of a federation) with one script, one style sheet and the
uPlot chart library shipped in the package: no request leaves for another host. Mounted
at ``/`` of the aggregator's operator port (``fedstack aggregator --operator-port P``),
where operators log in with their token and revoke agents or stop the aggregator; or over
a store alone, read-only: ``fedstack dashboard --db URL``.

See :mod:`fedstack.dashboard.app` for the routes and :mod:`fedstack.dashboard.sessions`
for the login session.
"""

from __future__ import annotations

from fedstack.dashboard.app import CSP, Dashboard, dashboard_middleware, dashboard_routes

__all__ = ["CSP", "Dashboard", "dashboard_middleware", "dashboard_routes"]
