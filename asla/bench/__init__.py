"""The benchmark: ASLA against a random builder and AGOX's searches, all counted by one calculator wrapper and
judged by one definition of "found".

Modules: problems (which problems, slugs, recipes, agents, default budgets), methods (one function per method
behind one interface), agox (AGOX adapters and patches), judge (the basin criterion and the strict one),
records (record and trace I/O, restore), report (markdown, json, plots), command (the command line).
"""
