"""loramux on Ray Serve: N replicas behind one address, requests routed by adapter id.

Installed as `loramux.ray_serve` by the optional extra `loramux[ray]`; the command is
`loramux-ray` (cli.py). Each replica runs one `loramux serve` on its node's loopback
and proxies to it (replica.py); one ingress (app.py) reads the adapter id of each request
and hands it to Serve's model multiplexing, so an adapter's requests go to the replica
that already holds it. Uploaded adapters live in one shared directory (adapter_dir.py).
"""
