//! One try at publishing: the job's messages from where the last try's confirms ended, each
//! through the confirm window, blocks to the operands exchange and tasks to the tasks exchange.

use anyhow::{Context, Result};
use gemmq::broker::{ConfirmWindow, persistent};
use gemmq::inputs::Operand;
use gemmq::message::{
    self, BlockId, Header, Manifest, OperandHeader, Side, TaskGroup, TaskHeader, Tiles, kind,
};
use gemmq::tiling::Operands;
use gemmq::topology::{self, TASK_KEY};
use tracing::info;

use crate::order::{self, Item, Order};
use crate::resume::StreamVanished;
use crate::unix_ms;

/// Where the producer's messages go: the confirm window, the channel that checks the job's
/// stream, and the count of bytes published.
pub(crate) struct Out<'a> {
    pub window: &'a mut ConfirmWindow,
    pub checker: &'a lapin::Channel,
    pub bytes: &'a mut u64,
}

/// Where a try starts publishing: at the first item not confirmed, after the blocks before it
/// when the stream that held them was lost.
pub(crate) struct Resume {
    pub skip: u64,
    pub blocks_again: bool,
}

pub(crate) async fn publish_messages(
    out: Out<'_>,
    topo: &topology::Topology,
    manifest: &Manifest,
    a: &Operand,
    b: &Operand,
    order: &Order,
    from: Resume,
) -> Result<()> {
    let mut send = Sender {
        out,
        topo,
        manifest,
        a,
        b,
        order,
        last_block: None,
    };
    let items = &order.items;
    // What a try publishes: everything from the first item not confirmed, and when the stream
    // was lost, the blocks before it too (first, so the confirmed count stays in order: see
    // `Publisher::try_once`).
    let skip = from.skip as usize;
    let again = items
        .iter()
        .take(skip)
        .filter(|item| from.blocks_again && item.on_stream());
    for item in again.chain(items.iter().skip(skip)) {
        match item {
            Item::Block(block) => send.block(*block).await?,
            Item::ChunkEnd => send.chunk_end().await?,
            Item::Tasks(tiles) => send.tasks(tiles).await?,
        }
    }
    if manifest.plan.operands == Operands::Stream {
        // A stream deleted after the last block was routed to it would take the blocks with it
        // unnoticed: once all is confirmed, look once more.
        send.out
            .window
            .flush()
            .await
            .context("waiting for the last confirms")?;
        check_stream(send.out.checker, topo, &manifest.job).await?;
    }
    Ok(())
}

/// One try's messages on their way.
struct Sender<'a, 'o> {
    out: Out<'o>,
    topo: &'a topology::Topology,
    manifest: &'a Manifest,
    a: &'a Operand,
    b: &'a Operand,
    order: &'a Order,
    /// How many messages the window had published with the last message to the stream, and
    /// whether it must end its chunk: a large block is written alone, neither after nor before
    /// another block in its chunk, and its chunk end alone after it.
    last_block: Option<(u64, bool)>,
}

impl Sender<'_, '_> {
    /// A block of A or B, through the operands exchange into the job's stream, where workers
    /// read the blocks their tasks need (see gemmq::topology). Mandatory, as every publish: a
    /// stream that is gone sends it back, and the try fails (`resume::stream_lost`).
    async fn block(&mut self, block: BlockId) -> Result<()> {
        let (plan, job) = (&self.manifest.plan, &self.manifest.job);
        let (rows, cols) = plan.block_shape(block);
        let operand = match block.side {
            Side::A => self.a,
            Side::B => self.b,
        };
        let header = Header::Operand(OperandHeader {
            job: job.clone(),
            run: self.manifest.run.clone(),
            block,
            dtype: plan.dtype,
            rows: rows.len() as u32,
            cols: cols.len() as u32,
        });
        // Made or read now, straight into the message, and dropped once published: the
        // producer never holds A or B.
        let mut body = message::encode_header(&header, plan.block_bytes(block) as usize);
        operand
            .append_le(rows, cols, &mut body)
            .with_context(|| format!("making block {block} of job {job}"))?;
        *self.out.bytes += body.len() as u64;
        let large = order::is_large(plan, block);
        let props = persistent(kind::OPERAND, format!("{job}/{block}"));
        self.onto_stream(&body, props, format!("block {block}"), large)
            .await?;
        info!(%job, %block, bytes = body.len(), "operand block published");
        Ok(())
    }

    /// The marker after a large block (see [`Item::ChunkEnd`]): a chunk of its own, like the
    /// block. Sent with the block, it reached the broker's stream writer with it and was written
    /// in the block's chunk, which then ended the stream while workers opened readers — and
    /// RabbitMQ checks the CRC32 of a stream's last chunk, twice, for every consumer that opens
    /// it (14 MiB blocks: 704 MiB checked in a 4096³ job whose 30 block reads read 384 MiB).
    async fn chunk_end(&mut self) -> Result<()> {
        let props = persistent(kind::CHUNK_END, format!("{}/chunk-end", self.manifest.job));
        self.onto_stream(&[], props, "a chunk end".to_string(), true)
            .await
    }

    /// Publishes a message to the job's operand stream, in a chunk of its own if it or the
    /// message before it is `alone`, and remembers it as the last one there.
    async fn onto_stream(
        &mut self,
        body: &[u8],
        props: lapin::BasicProperties,
        what: String,
        alone: bool,
    ) -> Result<()> {
        let job = &self.manifest.job;
        if let Some((n, previous_alone)) = self.last_block
            && (alone || previous_alone)
        {
            // The broker hands out a stream a chunk at a time, and writes what arrived together
            // as one chunk: a message sent before the one ahead of it is written (confirmed)
            // would share its chunk. Tasks keep flowing meanwhile.
            self.out
                .window
                .settle_through(n)
                .await
                .with_context(|| format!("waiting for the confirm of the message before {what}"))?;
        }
        let context = format!("publishing {what} of job {job}");
        self.out
            .window
            .publish(&self.topo.operands_exchange(), job, body, props, what)
            .await
            .context(context)?;
        self.last_block = Some((self.out.window.published(), alone));
        Ok(())
    }

    /// A task message: one task naming its blocks, one carrying them (inline), or a group.
    async fn tasks(&mut self, tiles: &[gemmq::TileId]) -> Result<()> {
        let (plan, job) = (&self.manifest.plan, &self.manifest.job);
        let tasks: Vec<TaskHeader> = tiles
            .iter()
            .map(|&tile| TaskHeader {
                at: self.order.places_of(tile),
                ..plan.task(job, &self.manifest.run, tile)
            })
            .collect();
        let first = tiles[0];
        let body = match (plan.operands == Operands::Stream, tasks.as_slice()) {
            (false, [task]) => message::encode(
                &Header::InlineTask(task.clone()),
                &[&self.inline_payload(first)?],
            ),
            (true, [task]) => message::encode(&Header::StreamedTask(task.clone()), &[]),
            _ => {
                let group = TaskGroup::of(&tasks).context("an empty task group")?;
                message::encode(&Header::TaskGroup(group), &[])
            }
        };
        *self.out.bytes += body.len() as u64;
        let tiles = Tiles(&tasks);
        let mut id = format!("{job}/{}/{}/{}", first.row, first.col, first.part);
        if tasks.len() > 1 {
            id.push_str(&format!("+{}", tasks.len() - 1));
        }
        // When it was published: shown in the management UI, and in the parking lot.
        let props = persistent(kind::TASK, id).with_timestamp(unix_ms() / 1000);
        self.out
            .window
            .publish(
                &self.topo.tasks_exchange(),
                TASK_KEY,
                &body,
                props,
                format!("task {tiles}"),
            )
            .await
            .with_context(|| format!("publishing task {tiles} of job {job}"))?;
        info!(%job, %tiles, bytes = body.len(), "task published");
        Ok(())
    }
}

impl Sender<'_, '_> {
    /// An inline task's payload: its block of A, then its block of B.
    fn inline_payload(&self, tile: gemmq::TileId) -> Result<Vec<u8>> {
        let plan = &self.manifest.plan;
        let (rows, cols, depth) = (
            plan.rows(tile.row),
            plan.cols(tile.col),
            plan.depth(tile.part),
        );
        let mut out = Vec::new();
        self.a.append_le(rows, depth.clone(), &mut out)?;
        self.b.append_le(depth, cols, &mut out)?;
        Ok(out)
    }
}

/// Fails with [`StreamVanished`] when the job's operand stream is gone.
async fn check_stream(
    checker: &lapin::Channel,
    topo: &topology::Topology,
    job: &str,
) -> Result<()> {
    let queue = topo.operands_queue(job);
    let exists = topology::queue_exists(checker, &queue)
        .await
        .with_context(|| format!("checking that {queue} exists"))?;
    if !exists {
        return Err(StreamVanished(job.to_string()).into());
    }
    Ok(())
}
