# back end 'db6': set up per-node return routes on ens5
# (replies from node N's address leave via node N's backend_gateway)
# node A (slot 0): from 2001:db8:19::101 via 2001:db8:19::1, table 7600, priority 20000
ip -6 addr add 2001:db8:19::101/64 dev ens5
ip -6 route add default via 2001:db8:19::1 dev ens5 table 7600 proto static
ip -6 rule add from 2001:db8:19::101 lookup 7600 priority 20000
# node C (slot 2): from 2001:db8:19::103 via 2001:db8:19::3, table 7602, priority 20002
ip -6 addr add 2001:db8:19::103/64 dev ens5
ip -6 route add default via 2001:db8:19::3 dev ens5 table 7602 proto static
ip -6 rule add from 2001:db8:19::103 lookup 7602 priority 20002
# node B (slot 5): from 2001:db8:19::102 via 2001:db8:19::2, table 7605, priority 20005
ip -6 addr add 2001:db8:19::102/64 dev ens5
ip -6 route add default via 2001:db8:19::2 dev ens5 table 7605 proto static
ip -6 rule add from 2001:db8:19::102 lookup 7605 priority 20005
