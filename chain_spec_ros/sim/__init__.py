"""Closed-loop driving in the scenario world (`chain-spec-sim`).

Replay tests are open loop: the planner never sees the consequences of its own plans. Here it
does. Each episode is one seeded scenario world (`scenarios.events`); the world's own scripted
driver brings the ego up to the planning start (so the first history and frames are those of a
dataset scene), then the planner drives:

    every planning tick (2 Hz of simulated time, the node's default rate)
        render the cameras from the ego's actual poses      (scenarios.render)
        history tokens from the ego's actual past poses     (scenarios.scene.local_history)
        Planner.plan -> CoC and trajectory                  (planner)
    every 20 ms between ticks
        pure pursuit + speed control on the latest plan     (controller)
        kinematic unicycle with actuator limits             (vehicle)
        actors move as the world scripts them               (scenarios.actors)

Modules: `vehicle` (the ego's motion model), `controller` (tracking a plan), `geometry` (boxes,
where a point is along the route), `episode` (running one episode; `scripted_episode` is the
world's own driver as a baseline), `metrics` (what an episode is judged by, and the score),
`modes` (decoding modes and lossy shortcuts), `figure` (the bird's-eye PNG), `cli` (the command).
"""
