//! The batcher's unit tests: merging and splitting, billing shares, the queue's choices,
//! and whole submits against a backend whose runs wait at a gate the test opens.

use super::*;
use crate::nn::ElementType;

fn t(rows: u32, cols: u32, fill: u8) -> Tensor {
    Tensor {
        dims: vec![rows, cols],
        ty: ElementType::U8,
        data: vec![fill; (rows * cols) as usize],
    }
}

#[test]
fn shares_sum_to_the_run_exactly_and_follow_the_rows() {
    for (total, rows) in [
        (1_000_003u64, vec![1, 1, 1]),
        (10, vec![3, 1, 2, 4]),
        (7, vec![5]),
        (0, vec![1, 2]),
        (u64::MAX / 2, vec![1, 1000, 7]),
    ] {
        let s = shares(total, &rows);
        assert_eq!(s.iter().sum::<u64>(), total, "{total} {rows:?}");
        let all: u64 = rows.iter().map(|&r| u64::from(r)).sum();
        for (share, r) in s.iter().zip(&rows) {
            let exact = total as f64 * f64::from(*r) / all as f64;
            assert!(
                (*share as f64 - exact).abs() <= 1.0 + exact * 1e-12,
                "{s:?}"
            );
        }
    }
    assert_eq!(shares(10, &[3, 1, 2, 4]), vec![3, 1, 2, 4]);
}

#[test]
fn merged_rows_split_back_to_their_owners() {
    let merged = merge([vec![t(2, 3, 1)], vec![t(1, 3, 2)], vec![t(3, 3, 3)]].iter());
    assert_eq!(merged[0].dims, vec![6, 3]);
    let parts = split(merged, &[2, 1, 3]).unwrap();
    assert_eq!(parts[0][0], t(2, 3, 1));
    assert_eq!(parts[1][0], t(1, 3, 2));
    assert_eq!(parts[2][0], t(3, 3, 3));
    // An output without the batch axis cannot be split.
    let e = split(vec![t(1, 3, 0)], &[2, 1]).unwrap_err();
    assert!(e.message.contains("cannot be split back by rows"), "{e}");
}

#[test]
fn only_equal_shapes_but_the_rows_share_a_run() {
    let entry = |inputs: Vec<Tensor>| Entry {
        id: 0,
        rows: rows_of(&inputs),
        inputs,
        deadline: Instant::now(),
        queued: Instant::now(),
        limits: Limits {
            max_rows: 8,
            max_wait_us: 0,
        },
        reply: tokio::sync::oneshot::channel().0,
    };
    let a = entry(vec![t(1, 3, 0)]);
    assert!(a.fits(&entry(vec![t(5, 3, 0)])));
    assert!(!a.fits(&entry(vec![t(1, 4, 0)])), "another width");
    let mut q: VecDeque<Entry> = [
        entry(vec![t(3, 3, 0)]),
        entry(vec![t(1, 4, 0)]),
        entry(vec![t(4, 3, 0)]),
        entry(vec![t(2, 3, 0)]),
    ]
    .into_iter()
    .collect();
    let batch = take(&mut q, 8);
    assert_eq!(batch.iter().map(|e| e.rows).collect::<Vec<_>>(), [3, 4]);
    assert_eq!(q.iter().map(|e| e.rows).collect::<Vec<_>>(), [1, 2]);
}

/// A queue as a driver sees it: `running` runs and drivers, `looking` of them choosing,
/// and these computes waiting (queued a moment ago, deadlines `deadline` away).
fn queue_of(running: usize, looking: usize, rows: &[u32], deadline: Duration) -> Queue {
    let now = Instant::now();
    let waiting = rows
        .iter()
        .enumerate()
        .map(|(id, &r)| Entry {
            id: id as u64,
            inputs: vec![t(r, 3, 0)],
            rows: r,
            deadline: now + deadline,
            queued: now,
            limits: Limits {
                max_rows: 16,
                max_wait_us: 5_000_000,
            },
            reply: tokio::sync::oneshot::channel().0,
        })
        .collect();
    Queue {
        waiting,
        running,
        looking,
        next_id: rows.len() as u64,
    }
}

fn rows_run(step: Next) -> Option<Vec<u32>> {
    match step {
        Next::Run(batch) => Some(batch.iter().map(|e| e.rows).collect()),
        _ => None,
    }
}

#[test]
fn a_batch_waits_to_fill_only_behind_real_runs_and_never_into_its_deadline() {
    let quick = |_: u32| Duration::from_millis(1);
    let far = Duration::from_secs(60);
    // One run in flight, this driver looking: wait to fill.
    let mut q = queue_of(2, 1, &[1, 1], far);
    assert!(matches!(next(&mut q, false, quick), Next::Fill(_)));
    // Two drivers looking and nothing running: neither waits on the other.
    let mut q = queue_of(2, 2, &[1, 1], far);
    assert_eq!(rows_run(next(&mut q, false, quick)), Some(vec![1, 1]));
    assert_eq!((q.running, q.looking), (2, 1));
    // A run in flight, but a full batch would not finish before the earliest
    // deadline if it waited: it goes now.
    let slow = |_: u32| Duration::from_secs(2);
    let mut q = queue_of(2, 1, &[1, 1], Duration::from_secs(1));
    assert_eq!(rows_run(next(&mut q, false, slow)), Some(vec![1, 1]));
    // The filling wait ends in time for a full batch before the deadline.
    let mut q = queue_of(2, 1, &[1], Duration::from_secs(3));
    let before = Instant::now();
    match next(&mut q, false, slow) {
        Next::Fill(until) => assert!(until <= before + Duration::from_secs(1)),
        _ => panic!("it should wait to fill"),
    }
    // Once the graph cannot batch, one compute a run.
    let mut q = queue_of(1, 1, &[2, 3], far);
    assert_eq!(rows_run(next(&mut q, true, quick)), Some(vec![2]));
    assert_eq!(q.waiting.len(), 1);
    // Nothing queued: the driver gives its session back.
    let mut q = queue_of(1, 1, &[], far);
    assert!(matches!(next(&mut q, false, quick), Next::Done));
    assert_eq!((q.running, q.looking), (0, 0));
}

#[test]
fn empty_or_disagreeing_inputs_never_merge() {
    assert!(mergeable(&[t(2, 3, 0), t(2, 5, 0)]));
    assert!(!mergeable(&[t(0, 3, 0)]), "no rows");
    assert!(!mergeable(&[t(1, 3, 0), t(2, 3, 0)]), "rows disagree");
    let scalar = Tensor {
        dims: vec![],
        ty: ElementType::U8,
        data: vec![0],
    };
    assert!(!mergeable(&[scalar]), "no leading axis");
}

#[test]
fn the_manifest_forms_read_and_bad_ones_say_what_works() {
    let read = |toml_value: &str| -> Result<BatchSpec, String> {
        #[derive(Deserialize)]
        struct W {
            batch: BatchSpec,
        }
        toml::from_str::<W>(&format!("batch = {toml_value}"))
            .map(|w| w.batch)
            .map_err(|e| e.to_string())
    };
    assert_eq!(read("\"off\""), Ok(BatchSpec::Off));
    assert_eq!(read("\"auto\""), Ok(BatchSpec::Auto));
    assert_eq!(
        read("{ max_rows = 32, max_wait_us = 2000 }"),
        Ok(BatchSpec::Fixed(Limits {
            max_rows: 32,
            max_wait_us: 2000
        }))
    );
    for (bad, says) in [
        ("\"on\"", "use \"off\", \"auto\""),
        ("{ max_rows = 0 }", "between 1 and 1024"),
        ("{ max_rows = 8, max_wait_us = 5000000 }", "at most 1000000"),
        ("{ max_rows = 8, wait = 1 }", "unknown field"),
    ] {
        let e = read(bad).unwrap_err();
        assert!(e.contains(says), "{bad}: {e}");
    }
    let json = serde_json::to_string(&BatchSpec::Fixed(Limits {
        max_rows: 4,
        max_wait_us: 10,
    }))
    .unwrap();
    assert_eq!(json, r#"{"max_rows":4,"max_wait_us":10}"#);
    assert_eq!(
        serde_json::from_str::<BatchSpec>(&json).unwrap().mode(),
        "fixed"
    );
    assert_eq!(
        serde_json::to_string(&BatchSpec::Auto).unwrap(),
        r#""auto""#
    );
}

/// Holds runs until the test lets them go: explicit hand-offs instead of sleeps.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: std::sync::Condvar,
}

impl Gate {
    /// Waits for the gate, at most 30 s: a test that failed before opening it must
    /// not hang on the runtime waiting for its blocking threads.
    fn pass(&self) {
        let open = self.open.lock().unwrap();
        let _ = self
            .opened
            .wait_timeout_while(open, Duration::from_secs(30), |open| !*open);
    }
    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

/// A backend that echoes its inputs after sleeping (and passing its gate, if closed),
/// and notes the rows of each run and the leading axis of each of its inputs.
struct Sleepy {
    delay: Duration,
    sessions: usize,
    runs: Arc<Mutex<Vec<u32>>>,
    leading: Arc<Mutex<Vec<Vec<u32>>>>,
    gate: Arc<Gate>,
    /// Answers one row whatever it was given (outputs without the batch axis).
    squash: bool,
    io: Vec<crate::nn::TensorInfo>,
}

impl crate::nn::BackendGraph for Sleepy {
    fn inputs(&self) -> &[crate::nn::TensorInfo] {
        &self.io
    }
    fn outputs(&self) -> &[crate::nn::TensorInfo] {
        &self.io
    }
    fn run(&self, inputs: Vec<Tensor>, _: &Cancel) -> Result<Vec<Tensor>, NnError> {
        self.runs.lock().unwrap().push(rows_of(&inputs));
        let leading = inputs.iter().map(|t| t.dims[0]).collect();
        self.leading.lock().unwrap().push(leading);
        self.gate.pass();
        std::thread::sleep(self.delay);
        match self.squash {
            true => Ok(vec![t(1, 3, 0)]),
            false => Ok(inputs),
        }
    }
    fn memory_bytes(&self) -> u64 {
        0
    }
    fn concurrency(&self) -> usize {
        self.sessions
    }
}

/// A test graph and what its backend notes.
struct Test {
    graph: Arc<LoadedGraph>,
    runs: Arc<Mutex<Vec<u32>>>,
    leading: Arc<Mutex<Vec<Vec<u32>>>>,
    gate: Arc<Gate>,
}

fn sleepy(delay: Duration) -> (Arc<LoadedGraph>, Arc<Mutex<Vec<u32>>>) {
    let t = sleepy_with(delay, 1, false);
    t.gate.open();
    (t.graph, t.runs)
}

/// A graph whose runs wait at a closed gate, then take `delay`.
fn sleepy_with(delay: Duration, sessions: usize, squash: bool) -> Test {
    let (runs, leading, gate) = Default::default();
    let graph = Sleepy {
        delay,
        sessions,
        runs: Arc::clone(&runs),
        leading: Arc::clone(&leading),
        gate: Arc::clone(&gate),
        squash,
        io: vec![crate::nn::TensorInfo {
            name: "x".into(),
            ty: Some(ElementType::U8),
            dims: vec![None, Some(3)],
        }],
    };
    let loaded = LoadedGraph::new(
        Box::new(graph),
        crate::nn::BackendKind::Tract,
        crate::nn::Device::Cpu,
        Arc::new(crate::meter::Metrics::new()),
    );
    Test {
        graph: Arc::new(loaded),
        runs,
        leading,
        gate,
    }
}

/// Waits (polling) until `ready` holds of the graph's queue.
async fn until(graph: &LoadedGraph, ready: impl Fn(&Queue) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready(&graph.batcher.queue()) {
        assert!(Instant::now() < deadline, "the queue never got there");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

const WIDE: Limits = Limits {
    max_rows: 16,
    max_wait_us: 0,
};

/// Submits `inputs` to `graph` on a task of its own.
fn spawn_submit(
    graph: &Arc<LoadedGraph>,
    inputs: Vec<Tensor>,
    limits: Limits,
    deadline: Instant,
) -> tokio::task::JoinHandle<Served> {
    let g = graph.clone();
    tokio::spawn(async move { submit(&g, inputs, limits, deadline).await })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn computes_queued_behind_a_run_share_the_next_one_and_each_gets_its_rows() {
    let Test {
        graph, runs, gate, ..
    } = sleepy_with(Duration::ZERO, 1, false);
    let far = Instant::now() + Duration::from_secs(30);
    let first = spawn_submit(&graph, vec![t(1, 3, 9)], WIDE, far);
    until(&graph, |q| q.running == 1).await;
    let queued: Vec<_> = (1..=4u8)
        .map(|i| spawn_submit(&graph, vec![t(u32::from(i), 3, i)], WIDE, far))
        .collect();
    until(&graph, |q| q.waiting.len() == 4).await;
    gate.open();
    let first = first.await.unwrap();
    assert_eq!((first.batch_rows, first.waited), (1, Duration::ZERO));
    for (i, q) in queued.into_iter().enumerate() {
        let served = q.await.unwrap();
        let rows = i as u32 + 1;
        assert_eq!(
            served.outputs.unwrap(),
            vec![t(rows, 3, rows as u8)],
            "its own rows"
        );
        assert_eq!(served.batch_rows, 10, "one run of 1+2+3+4 rows");
        assert!(served.waited > Duration::ZERO);
    }
    assert_eq!(*runs.lock().unwrap(), vec![1, 10]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compute_whose_inputs_disagree_on_their_rows_never_shares_a_run() {
    let Test {
        graph,
        leading,
        gate,
        ..
    } = sleepy_with(Duration::ZERO, 1, false);
    let far = Instant::now() + Duration::from_secs(30);
    let go = |inputs: Vec<Tensor>| spawn_submit(&graph, inputs, WIDE, far);
    let first = go(vec![t(1, 3, 0), t(1, 3, 0)]);
    until(&graph, |q| q.running == 1).await;
    // One row in its first input, two in its second: merged, its second input's rows
    // would pair with other requests' first rows.
    let odd = go(vec![t(1, 3, 1), t(2, 3, 1)]);
    let even: Vec<_> = (2..4).map(|i| go(vec![t(1, 3, i), t(1, 3, i)])).collect();
    until(&graph, |q| q.waiting.len() == 2).await;
    gate.open();
    assert_eq!(
        odd.await.unwrap().outputs.unwrap(),
        vec![t(1, 3, 1), t(2, 3, 1)]
    );
    for (i, e) in (2..4).zip(even) {
        assert_eq!(
            e.await.unwrap().outputs.unwrap(),
            vec![t(1, 3, i), t(1, 3, i)]
        );
    }
    assert!(first.await.unwrap().outputs.is_ok());
    let mut leading = leading.lock().unwrap().clone();
    leading.sort();
    assert_eq!(leading, [vec![1, 1], vec![1, 2], vec![2, 2]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_without_the_batch_axis_turn_batching_off_for_the_graph() {
    let Test {
        graph, runs, gate, ..
    } = sleepy_with(Duration::ZERO, 1, true);
    assert!(graph.limits(BatchSpec::Fixed(WIDE)).is_some());
    let far = Instant::now() + Duration::from_secs(30);
    let go = |i: u8| spawn_submit(&graph, vec![t(1, 3, i)], WIDE, far);
    let first = go(0);
    until(&graph, |q| q.running == 1).await;
    let queued = [go(1), go(2)];
    until(&graph, |q| q.waiting.len() == 2).await;
    gate.open();
    assert!(first.await.unwrap().outputs.is_ok());
    for q in queued {
        // Each ran again by itself and got the model's answer.
        assert_eq!(q.await.unwrap().outputs.unwrap(), vec![t(1, 3, 0)]);
    }
    assert_eq!(*runs.lock().unwrap(), vec![1, 2, 1, 1]);
    assert!(
        graph
            .unbatchable()
            .is_some_and(|why| why.contains("cannot be split back by rows")),
        "{:?}",
        graph.unbatchable()
    );
    assert_eq!(graph.limits(BatchSpec::Fixed(WIDE)), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_passing_in_the_queue_answers_at_once_and_the_rest_run() {
    let Test {
        graph, runs, gate, ..
    } = sleepy_with(Duration::ZERO, 1, false);
    let far = Instant::now() + Duration::from_secs(30);
    let first = spawn_submit(&graph, vec![t(1, 3, 0)], WIDE, far);
    until(&graph, |q| q.running == 1).await;
    let soon = Instant::now() + Duration::from_millis(30);
    let short = spawn_submit(&graph, vec![t(1, 3, 1)], WIDE, soon);
    let patient = spawn_submit(&graph, vec![t(2, 3, 2)], WIDE, far);
    // The run in flight is held at the gate: the short compute's answer comes while
    // it is still running.
    let short = short.await.unwrap();
    let e = short.outputs.unwrap_err();
    assert_eq!(e.code, ErrorCode::Timeout, "{e}");
    gate.open();
    assert!(first.await.unwrap().outputs.is_ok());
    assert_eq!(patient.await.unwrap().outputs.unwrap(), vec![t(2, 3, 2)]);
    assert_eq!(
        *runs.lock().unwrap(),
        vec![1, 2],
        "the timed-out compute never ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_compute_runs_at_once_and_a_fill_wait_needs_company_in_flight() {
    let (graph, runs) = sleepy(Duration::from_millis(1));
    let long_wait = Limits {
        max_rows: 16,
        max_wait_us: 5_000_000,
    };
    let far = Instant::now() + Duration::from_secs(30);
    for _ in 0..3 {
        let started = Instant::now();
        let served = submit(&graph, vec![t(1, 3, 0)], long_wait, far).await;
        assert!(served.outputs.is_ok());
        assert_eq!(served.batch_rows, 1);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "it never waited to fill"
        );
    }
    assert_eq!(*runs.lock().unwrap(), vec![1, 1, 1]);
    let q = graph.batcher.queue();
    assert_eq!(
        (q.running, q.looking, q.waiting.len()),
        (0, 0, 0),
        "sessions given back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_filling_behind_a_run_goes_as_soon_as_that_run_ends() {
    let Test {
        graph, runs, gate, ..
    } = sleepy_with(Duration::ZERO, 2, false);
    let patient = Limits {
        max_rows: 16,
        max_wait_us: 5_000_000,
    };
    let far = Instant::now() + Duration::from_secs(30);
    let first = spawn_submit(&graph, vec![t(1, 3, 0)], patient, far);
    until(&graph, |q| q.running == 1).await;
    let second = spawn_submit(&graph, vec![t(1, 3, 1)], patient, far);
    // The second waits to fill (a run is in flight and a session is free)...
    until(&graph, |q| q.waiting.len() == 1 && q.looking == 1).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(*runs.lock().unwrap(), vec![1], "it waited to fill");
    // ...until that run ends, long before its 5 s wait is up.
    let opened = Instant::now();
    gate.open();
    assert!(first.await.unwrap().outputs.is_ok());
    assert!(second.await.unwrap().outputs.is_ok());
    assert!(
        opened.elapsed() < Duration::from_secs(2),
        "waited to fill after the run in flight had ended: {:?}",
        opened.elapsed()
    );
    assert_eq!(*runs.lock().unwrap(), vec![1, 1]);
}

#[test]
fn a_run_waiting_without_computing_keeps_the_cpu_backend_barely_busy() {
    // Sleepy sleeps in `run`: 50 ms of wall time, next to no CPU time. The cost model's
    // fit must see the latter (a run sharing a core waits the same way).
    let Test { graph, gate, .. } = sleepy_with(Duration::from_millis(50), 1, false);
    gate.open();
    let started = Instant::now();
    let (outputs, busy) = run_guarded(&graph, vec![t(1, 3, 0)], &Cancel::default());
    assert!(outputs.is_ok());
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert!(busy < Duration::from_millis(20), "{busy:?}");
}
