"""Facts about an FX graph that the compiler and every pattern may ask: example values and op
names (nodes), where a node came from (source), memory, aliasing and writes (mutation), grad mode,
dtypes and casts (precision), symbolic shapes, strides (layout) and the moves that keep a
schedule valid (schedule).  Imports nothing from ligerfx above it."""
