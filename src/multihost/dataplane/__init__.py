"""Kernel data plane: nft ruleset, host setup, ARP/NDP responder."""
