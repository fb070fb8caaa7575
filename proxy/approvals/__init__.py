"""Human approval of NEEDS_APPROVAL requests (docs/approvals.md).

- :mod:`.config`: the ``approvals:`` section;
- :mod:`.model`: approvals and the rules of their transitions (pure);
- :mod:`.store`: the store port, with :mod:`.memory` and :mod:`.redisstore`;
- :mod:`.records`: their audit records (pure);
- :mod:`.service`: store + audit + metrics + webhook, what the core calls;
- :mod:`.notify`: the webhook;
- :mod:`.api`: the approver API on the admin listener.
"""
