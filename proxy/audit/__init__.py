"""Hash-chained audit trail: records, chain hashing, stores and verification."""
