"""Load drills (locust scenarios with an audit) and the benchmark of the appliance.

Entry points: `bin/loadtest SCENARIO` (loadtest.runner) and `bin/bench` (loadtest.bench). Modules that
import locust monkey-patch the whole process, so only those entry points and tests/loadtest import them.
"""
