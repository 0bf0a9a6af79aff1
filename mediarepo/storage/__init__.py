"""The database layer: the pool, the schema and the queries, per table family.

Nothing here knows about HTTP; the media layer calls these stores.
"""
