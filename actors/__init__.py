"""Users, the catalog model, and the shard actors that host users.

The domain rules (``actors.user``) are pure synchronous code; ``actors.shard``
is the thin Ray adapter around them.
"""
