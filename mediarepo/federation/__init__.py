"""Server keys, request signing and (later) the federation client."""
