# back end 'db1': set up per-node return routes on eth1
# (replies from node N's address leave via node N's backend_gateway)
# node A (slot 0): from 198.19.0.101 via 198.19.0.1, table 100, priority 1000
ip -4 addr add 198.19.0.101/24 dev eth1
ip -4 route add default via 198.19.0.1 dev eth1 table 100 proto static
ip -4 rule add from 198.19.0.101 lookup 100 priority 1000
# node C (slot 2): from 198.19.0.103 via 198.19.0.3, table 102, priority 1002
ip -4 addr add 198.19.0.103/24 dev eth1
ip -4 route add default via 198.19.0.3 dev eth1 table 102 proto static
ip -4 rule add from 198.19.0.103 lookup 102 priority 1002
# node B (slot 5): from 198.19.0.102 via 198.19.0.2, table 105, priority 1005
ip -4 addr add 198.19.0.102/24 dev eth1
ip -4 route add default via 198.19.0.2 dev eth1 table 105 proto static
ip -4 rule add from 198.19.0.102 lookup 105 priority 1005
