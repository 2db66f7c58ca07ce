"""Graph passes that find attention-with-KV-cache sites and rewrite them to OScaR ops.

Installed as ``oscar_compile.passes``. (Populated by the graph-pass work; see README.)
"""
