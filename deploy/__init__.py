"""medfed.deploy: the consortium PKI and provisioning, and Flower's deployment processes.

SuperLink (`medfed server`), SuperNodes (`medfed site`) and run submission (`medfed run`).
"""
