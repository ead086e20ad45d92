-- Cheaper dedup records: the B-tree on the position of each claim is
-- replaced by a BRIN index on its offset.
-- {schema} is replaced by the configured schema name.

-- Every claimed key paid an entry in the B-tree, about a quarter of the
-- cost of inserting a dedup record, for a lookup only `consumer replay
-- --reprocess` makes. Offsets grow with insertion order, so a BRIN index
-- (one summary per range of table blocks, nearly free to maintain) narrows
-- that rare range delete to the blocks holding the range.
DROP INDEX IF EXISTS {schema}.inbox_position;
CREATE INDEX inbox_offset ON {schema}.inbox USING brin ("offset");
