"""Tools that run on an emulated host of their own: `luvmm demo` (``demo``),
`luvmm bench blackout|scale|soak` (``bench``) and `luvmm bench chaos`
(``chaos``).  Like the CLI, they are entry points that wire the emulated
host; what they drive is the product's own API (luvmm.vmm.manage,
luvmm.liveupdate.update)."""
