"""Column masking: rules, the query rewriter, the masking gate and the wire-level value masks."""
