"""How the game runs: the shard actor and what it is made of.

``actor`` is the Ray actor; ``host`` applies batches; ``residents``
activates and passivates entities; ``coordinator`` runs the sagas on
allowances; ``expiry`` expires time-limited items; ``link`` is the
gateway-to-shard connection, both ends; ``records`` is what they exchange
and write down.  The rules themselves (what a request does) are the pure
modules one level up, in ``actors``.
"""
