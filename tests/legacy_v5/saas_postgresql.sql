--
-- PostgreSQL database dump
--


-- Dumped from database version 15.18 (Debian 15.18-0+deb12u1)
-- Dumped by pg_dump version 15.18 (Debian 15.18-0+deb12u1)

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

--
-- Name: saas_contract_seal_guard(); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.saas_contract_seal_guard() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF current_setting('sidecar.contract_seal', true) IS DISTINCT FROM 'net' THEN
        RAISE EXCEPTION USING MESSAGE = 'this usage database bills contract dimensions net of '
            || 'the contract (schema 5): a sidecar older than that must not seal hours in it; '
            || 'upgrade every replica';
    END IF;
    RETURN NULL;
END $$;


--
-- Name: saas_outbox_counted(); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.saas_outbox_counted() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    INSERT INTO saas_counts AS c (hour, dimension, state, records, quantity)
    SELECT hour, dimension, state, COUNT(*), SUM(quantity) FROM saas_new
    GROUP BY hour, dimension, state
    ON CONFLICT (hour, dimension, state) DO UPDATE SET records = c.records + excluded.records,
    quantity = c.quantity + excluded.quantity;
    RETURN NULL;
END $$;


--
-- Name: saas_outbox_recounted(); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.saas_outbox_recounted() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    INSERT INTO saas_counts AS c (hour, dimension, state, records, quantity)
    SELECT hour, dimension, state, SUM(d_records), SUM(d_quantity) FROM (
        SELECT hour, dimension, state, 1 AS d_records, quantity AS d_quantity FROM saas_new
        UNION ALL
        SELECT hour, dimension, state, -1, -quantity FROM saas_old
    ) AS delta GROUP BY hour, dimension, state HAVING SUM(d_records) <> 0
    ON CONFLICT (hour, dimension, state) DO UPDATE SET records = c.records + excluded.records,
    quantity = c.quantity + excluded.quantity;
    RETURN NULL;
END $$;


--
-- Name: saas_quantity_unit_guard(); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.saas_quantity_unit_guard() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF current_setting('sidecar.quantity_unit', true) IS DISTINCT FROM 'micro' THEN
        RAISE EXCEPTION USING MESSAGE = 'this usage database holds micro-unit quantities '
            || '(schema 3): a sidecar older than that must not write usage to it; '
            || 'upgrade every replica';
    END IF;
    RETURN NULL;
END $$;


SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: saas_batches; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_batches (
    id text NOT NULL,
    request text NOT NULL,
    records bigint NOT NULL,
    state text NOT NULL,
    parent text,
    created_at double precision NOT NULL,
    deadline double precision NOT NULL,
    attempts bigint DEFAULT 0 NOT NULL,
    last_code text,
    answered_at double precision
);


--
-- Name: saas_changes; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_changes (
    seq bigint NOT NULL,
    subject text NOT NULL,
    at double precision NOT NULL
);


--
-- Name: saas_changes_seq_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.saas_changes_seq_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: saas_changes_seq_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.saas_changes_seq_seq OWNED BY public.saas_changes.seq;


--
-- Name: saas_contract_hours; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_contract_hours (
    customer text NOT NULL,
    dimension text NOT NULL,
    hour bigint NOT NULL,
    basis text NOT NULL,
    used bigint NOT NULL,
    entitled text,
    covered bigint NOT NULL,
    billed bigint NOT NULL,
    term_end double precision NOT NULL,
    why text NOT NULL,
    sealed_at double precision NOT NULL
);


--
-- Name: saas_counts; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_counts (
    hour bigint NOT NULL,
    dimension text NOT NULL,
    state text NOT NULL,
    records bigint NOT NULL,
    quantity numeric(38,0) NOT NULL
);


--
-- Name: saas_customer_seals; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_customer_seals (
    customer text NOT NULL,
    hour bigint NOT NULL,
    sealed_at double precision NOT NULL
);


--
-- Name: saas_customers; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_customers (
    customer text NOT NULL,
    account_id text,
    license_arn text,
    product_code text,
    customer_identifier text,
    state text NOT NULL,
    state_since double precision NOT NULL,
    state_reason text,
    resolved_at double precision NOT NULL,
    token_digest text,
    token_expires double precision,
    agreement_id text
);


--
-- Name: saas_dead_letters; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_dead_letters (
    id text NOT NULL,
    body text NOT NULL,
    bytes bigint NOT NULL,
    error text NOT NULL,
    received_at double precision NOT NULL
);


--
-- Name: saas_entitlements; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_entitlements (
    subject text NOT NULL,
    dimension text NOT NULL,
    value text NOT NULL,
    expiration double precision,
    learned_at double precision NOT NULL,
    kind text
);


--
-- Name: saas_events; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_events (
    id text NOT NULL,
    kind text NOT NULL,
    subject text NOT NULL,
    event_time double precision NOT NULL,
    applied_at double precision NOT NULL,
    outcome text NOT NULL
);


--
-- Name: saas_hour_sending; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_hour_sending (
    hour bigint NOT NULL,
    sealed_at double precision NOT NULL,
    records bigint NOT NULL,
    backlog_before bigint NOT NULL,
    finished_at double precision
);


--
-- Name: saas_hour_summary; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_hour_summary (
    hour bigint NOT NULL,
    dimension text NOT NULL,
    state text NOT NULL,
    records bigint NOT NULL,
    quantity numeric(38,0) NOT NULL,
    zero_records bigint NOT NULL
);


--
-- Name: saas_keys; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_keys (
    id text NOT NULL,
    digest text NOT NULL,
    answer text NOT NULL,
    created_at double precision NOT NULL
);


--
-- Name: saas_lifecycle; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_lifecycle (
    subject text NOT NULL,
    state text NOT NULL,
    state_time double precision NOT NULL,
    event_time double precision NOT NULL,
    left_at double precision,
    final_window_end double precision,
    agreement_id text,
    license_arn text,
    product_code text,
    offer_id text,
    free_trial integer,
    last_event text NOT NULL,
    updated_at double precision NOT NULL,
    entitlements_at double precision,
    left_license text
);


--
-- Name: saas_open; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_open (
    customer text NOT NULL,
    dimension text NOT NULL,
    hour bigint NOT NULL,
    quantity bigint NOT NULL
);


--
-- Name: saas_outbox; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_outbox (
    customer text NOT NULL,
    dimension text NOT NULL,
    hour bigint NOT NULL,
    quantity bigint NOT NULL,
    zero integer NOT NULL,
    record text NOT NULL,
    state text NOT NULL,
    batch_id text,
    sealed_at double precision NOT NULL,
    deadline double precision NOT NULL,
    metering_record_id text,
    last_code text,
    last_error text,
    done_at double precision
);


--
-- Name: saas_records; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_records (
    id text NOT NULL,
    customer text NOT NULL,
    dimension text NOT NULL,
    hour bigint NOT NULL,
    quantity bigint NOT NULL,
    received_at double precision NOT NULL,
    carried_from bigint
);


--
-- Name: saas_sealed_hours; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saas_sealed_hours (
    hour bigint NOT NULL,
    sealed_at double precision NOT NULL,
    records bigint NOT NULL
);


--
-- Name: sidecar_schema; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.sidecar_schema (
    name text NOT NULL,
    version bigint NOT NULL,
    migrated_at double precision NOT NULL
);


--
-- Name: saas_changes seq; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_changes ALTER COLUMN seq SET DEFAULT nextval('public.saas_changes_seq_seq'::regclass);


--
-- Data for Name: saas_batches; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.saas_batches VALUES ('d8b76c3ab4c14fc2859711920b6e6c87', '{"UsageRecords":[{"CustomerAWSAccountId":"111111111111","Dimension":"scans","LicenseArn":"arn:aws:license-manager::111111111111:license:l-111111111111","QuantityAsDecimal":"2.5","Timestamp":1799991000}]}', 1, 'done', NULL, 1799992920, 1800075480, 1, 'ok', 1799992921);
INSERT INTO public.saas_batches VALUES ('3381414e833d4319906cd08adda84a65', '{"UsageRecords":[{"CustomerAWSAccountId":"111111111111","Dimension":"scans","LicenseArn":"arn:aws:license-manager::111111111111:license:l-111111111111","QuantityAsDecimal":"7.000001","Timestamp":1799994600},{"CustomerAWSAccountId":"222222222222","Dimension":"users","LicenseArn":"arn:aws:license-manager::222222222222:license:l-222222222222","QuantityAsDecimal":"3","Timestamp":1799994600}]}', 2, 'sending', NULL, 1799996520, 1800079080, 0, NULL, NULL);


--
-- Data for Name: saas_changes; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: saas_contract_hours; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: saas_counts; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.saas_counts VALUES (499997, 'scans', 'sealed', 0, 0);
INSERT INTO public.saas_counts VALUES (499997, 'scans', 'sent', 1, 2500000);
INSERT INTO public.saas_counts VALUES (499998, 'users', 'sealed', 1, 3000000);
INSERT INTO public.saas_counts VALUES (499998, 'scans', 'sealed', 1, 7000001);


--
-- Data for Name: saas_customer_seals; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: saas_customers; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.saas_customers VALUES ('111111111111/arn:aws:license-manager::111111111111:license:l-111111111111', '111111111111', 'arn:aws:license-manager::111111111111:license:l-111111111111', 'prod-abc', NULL, 'active', 1799985600, NULL, 1799985600, '6c02cf2083469e72758a38be0b7c6eabe9bc58580774daf6b2cf4b6ea1469722', 1799989200, 'agmt-1111111111111111111111111');
INSERT INTO public.saas_customers VALUES ('222222222222/arn:aws:license-manager::222222222222:license:l-222222222222', '222222222222', 'arn:aws:license-manager::222222222222:license:l-222222222222', 'prod-abc', NULL, 'active', 1799985600, NULL, 1799985600, '3f08aace122ee2368432c1ca23a049bc640bafbf00fdf33a52429f38ba12dbf9', 1799989200, NULL);


--
-- Data for Name: saas_dead_letters; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: saas_entitlements; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: saas_events; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: saas_hour_sending; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: saas_hour_summary; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: saas_keys; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.saas_keys VALUES ('k-0', '67261f0d90a55fa58845cec84fdd23caa16f68d19fec6ea64e085f79f6cd8d59', '{"customer":"111111111111/arn:aws:license-manager::111111111111:license:l-111111111111","dimension":"scans","hour":"2027-01-15T05:00:00Z","id":"k-0","quantity":"2.5"}', 1799989800);
INSERT INTO public.saas_keys VALUES ('k-1', '84ae55f84ba6eeb604eaaee23630a588373031e8aaefb7828446e8adb637da4b', '{"customer":"111111111111/arn:aws:license-manager::111111111111:license:l-111111111111","dimension":"scans","hour":"2027-01-15T06:00:00Z","id":"k-1","quantity":"7.000001"}', 1799993400);
INSERT INTO public.saas_keys VALUES ('k-2', '52b5ea798197e902f4e4b88f2b98982a65e45a1280f2894eeb2b09a2f4c59747', '{"customer":"222222222222/arn:aws:license-manager::222222222222:license:l-222222222222","dimension":"users","hour":"2027-01-15T06:00:00Z","id":"k-2","quantity":3}', 1799993400);
INSERT INTO public.saas_keys VALUES ('k-3', '499eb6b250fd6412268ac33ce65545822510de108edf5194a127f06117059273', '{"customer":"111111111111/arn:aws:license-manager::111111111111:license:l-111111111111","dimension":"scans","hour":"2027-01-15T07:00:00Z","id":"k-3","quantity":5}', 1799999880);
INSERT INTO public.saas_keys VALUES ('k-late', '55d15f1e29fb8d55eaedf8565bdf0d2144ac758b4c37f6479eb3b1e6b7ec04b2', '{"carried_from":"2027-01-15T06:00:00Z","customer":"111111111111/arn:aws:license-manager::111111111111:license:l-111111111111","dimension":"scans","hour":"2027-01-15T07:00:00Z","id":"k-late","note":"hour 2027-01-15T06:00:00Z is already sealed or too old to send; counted in 2027-01-15T07:00:00Z","quantity":1}', 1799999900);


--
-- Data for Name: saas_lifecycle; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: saas_open; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.saas_open VALUES ('222222222222/arn:aws:license-manager::222222222222:license:l-222222222222', 'scans', 499999, 250000);
INSERT INTO public.saas_open VALUES ('111111111111/arn:aws:license-manager::111111111111:license:l-111111111111', 'scans', 499999, 6000000);


--
-- Data for Name: saas_outbox; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.saas_outbox VALUES ('111111111111/arn:aws:license-manager::111111111111:license:l-111111111111', 'scans', 499997, 2500000, 0, '{"CustomerAWSAccountId":"111111111111","Dimension":"scans","LicenseArn":"arn:aws:license-manager::111111111111:license:l-111111111111","QuantityAsDecimal":"2.5","Timestamp":1799991000}', 'sent', 'd8b76c3ab4c14fc2859711920b6e6c87', 1799992860, 1800075480, 'm-0', 'Success', NULL, 1799992921);
INSERT INTO public.saas_outbox VALUES ('111111111111/arn:aws:license-manager::111111111111:license:l-111111111111', 'scans', 499998, 7000001, 0, '{"CustomerAWSAccountId":"111111111111","Dimension":"scans","LicenseArn":"arn:aws:license-manager::111111111111:license:l-111111111111","QuantityAsDecimal":"7.000001","Timestamp":1799994600}', 'sealed', '3381414e833d4319906cd08adda84a65', 1799996460, 1800079080, NULL, NULL, NULL, NULL);
INSERT INTO public.saas_outbox VALUES ('222222222222/arn:aws:license-manager::222222222222:license:l-222222222222', 'users', 499998, 3000000, 0, '{"CustomerAWSAccountId":"222222222222","Dimension":"users","LicenseArn":"arn:aws:license-manager::222222222222:license:l-222222222222","QuantityAsDecimal":"3","Timestamp":1799994600}', 'sealed', '3381414e833d4319906cd08adda84a65', 1799996460, 1800079080, NULL, NULL, NULL, NULL);


--
-- Data for Name: saas_records; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: saas_sealed_hours; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.saas_sealed_hours VALUES (499997, 1799992860, 1);
INSERT INTO public.saas_sealed_hours VALUES (499998, 1799996460, 2);


--
-- Data for Name: sidecar_schema; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.sidecar_schema VALUES ('saas.sqlite3', 5, 1796698627.695139);


--
-- Name: saas_changes_seq_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.saas_changes_seq_seq', 1, false);


--
-- Name: saas_batches saas_batches_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_batches
    ADD CONSTRAINT saas_batches_pkey PRIMARY KEY (id);


--
-- Name: saas_changes saas_changes_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_changes
    ADD CONSTRAINT saas_changes_pkey PRIMARY KEY (seq);


--
-- Name: saas_contract_hours saas_contract_hours_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_contract_hours
    ADD CONSTRAINT saas_contract_hours_pkey PRIMARY KEY (customer, dimension, hour);


--
-- Name: saas_counts saas_counts_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_counts
    ADD CONSTRAINT saas_counts_pkey PRIMARY KEY (hour, dimension, state);


--
-- Name: saas_customer_seals saas_customer_seals_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_customer_seals
    ADD CONSTRAINT saas_customer_seals_pkey PRIMARY KEY (customer, hour);


--
-- Name: saas_customers saas_customers_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_customers
    ADD CONSTRAINT saas_customers_pkey PRIMARY KEY (customer);


--
-- Name: saas_dead_letters saas_dead_letters_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_dead_letters
    ADD CONSTRAINT saas_dead_letters_pkey PRIMARY KEY (id);


--
-- Name: saas_entitlements saas_entitlements_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_entitlements
    ADD CONSTRAINT saas_entitlements_pkey PRIMARY KEY (subject, dimension);


--
-- Name: saas_events saas_events_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_events
    ADD CONSTRAINT saas_events_pkey PRIMARY KEY (id);


--
-- Name: saas_hour_sending saas_hour_sending_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_hour_sending
    ADD CONSTRAINT saas_hour_sending_pkey PRIMARY KEY (hour);


--
-- Name: saas_hour_summary saas_hour_summary_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_hour_summary
    ADD CONSTRAINT saas_hour_summary_pkey PRIMARY KEY (hour, dimension, state);


--
-- Name: saas_keys saas_keys_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_keys
    ADD CONSTRAINT saas_keys_pkey PRIMARY KEY (id);


--
-- Name: saas_lifecycle saas_lifecycle_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_lifecycle
    ADD CONSTRAINT saas_lifecycle_pkey PRIMARY KEY (subject);


--
-- Name: saas_open saas_open_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_open
    ADD CONSTRAINT saas_open_pkey PRIMARY KEY (customer, dimension, hour);


--
-- Name: saas_outbox saas_outbox_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_outbox
    ADD CONSTRAINT saas_outbox_pkey PRIMARY KEY (customer, dimension, hour);


--
-- Name: saas_records saas_records_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_records
    ADD CONSTRAINT saas_records_pkey PRIMARY KEY (id);


--
-- Name: saas_sealed_hours saas_sealed_hours_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saas_sealed_hours
    ADD CONSTRAINT saas_sealed_hours_pkey PRIMARY KEY (hour);


--
-- Name: sidecar_schema sidecar_schema_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.sidecar_schema
    ADD CONSTRAINT sidecar_schema_pkey PRIMARY KEY (name);


--
-- Name: saas_batches_by_state; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX saas_batches_by_state ON public.saas_batches USING btree (state, created_at);


--
-- Name: saas_contract_hours_by_term; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX saas_contract_hours_by_term ON public.saas_contract_hours USING btree (customer, dimension, term_end);


--
-- Name: saas_contract_hours_ended; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX saas_contract_hours_ended ON public.saas_contract_hours USING btree (term_end) WHERE ((basis = 'term'::text) AND (term_end <> ('-1'::integer)::double precision));


--
-- Name: saas_contract_hours_hourly; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX saas_contract_hours_hourly ON public.saas_contract_hours USING btree (hour) WHERE (basis = 'hour'::text);


--
-- Name: saas_contract_hours_unused; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX saas_contract_hours_unused ON public.saas_contract_hours USING btree (hour) WHERE (used = 0);


--
-- Name: saas_customers_by_account; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX saas_customers_by_account ON public.saas_customers USING btree (account_id);


--
-- Name: saas_customers_by_identifier; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX saas_customers_by_identifier ON public.saas_customers USING btree (customer_identifier);


--
-- Name: saas_customers_by_token; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX saas_customers_by_token ON public.saas_customers USING btree (token_digest);


--
-- Name: saas_events_by_applied; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX saas_events_by_applied ON public.saas_events USING btree (applied_at);


--
-- Name: saas_open_by_hour; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX saas_open_by_hour ON public.saas_open USING btree (hour);


--
-- Name: saas_outbox_by_batch; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX saas_outbox_by_batch ON public.saas_outbox USING btree (batch_id) WHERE (batch_id IS NOT NULL);


--
-- Name: saas_outbox_by_hour; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX saas_outbox_by_hour ON public.saas_outbox USING btree (hour);


--
-- Name: saas_outbox_pool; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX saas_outbox_pool ON public.saas_outbox USING btree (deadline, customer, dimension) WHERE ((state = 'sealed'::text) AND (batch_id IS NULL));


--
-- Name: saas_records_by_hour; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX saas_records_by_hour ON public.saas_records USING btree (hour, customer, dimension);


--
-- Name: saas_open saas_open_unit_guard; Type: TRIGGER; Schema: public; Owner: -
--

CREATE TRIGGER saas_open_unit_guard BEFORE INSERT OR UPDATE ON public.saas_open FOR EACH STATEMENT EXECUTE FUNCTION public.saas_quantity_unit_guard();


--
-- Name: saas_outbox saas_outbox_counted; Type: TRIGGER; Schema: public; Owner: -
--

CREATE TRIGGER saas_outbox_counted AFTER INSERT ON public.saas_outbox REFERENCING NEW TABLE AS saas_new FOR EACH STATEMENT EXECUTE FUNCTION public.saas_outbox_counted();


--
-- Name: saas_outbox saas_outbox_recounted; Type: TRIGGER; Schema: public; Owner: -
--

CREATE TRIGGER saas_outbox_recounted AFTER UPDATE ON public.saas_outbox REFERENCING OLD TABLE AS saas_old NEW TABLE AS saas_new FOR EACH STATEMENT EXECUTE FUNCTION public.saas_outbox_recounted();


--
-- Name: saas_outbox saas_outbox_unit_guard; Type: TRIGGER; Schema: public; Owner: -
--

CREATE TRIGGER saas_outbox_unit_guard BEFORE INSERT ON public.saas_outbox FOR EACH STATEMENT EXECUTE FUNCTION public.saas_quantity_unit_guard();


--
-- Name: saas_outbox saas_outbox_v5_seal_guard; Type: TRIGGER; Schema: public; Owner: -
--

CREATE TRIGGER saas_outbox_v5_seal_guard BEFORE INSERT ON public.saas_outbox FOR EACH STATEMENT EXECUTE FUNCTION public.saas_contract_seal_guard();


--
-- Name: saas_records saas_records_unit_guard; Type: TRIGGER; Schema: public; Owner: -
--

CREATE TRIGGER saas_records_unit_guard BEFORE INSERT ON public.saas_records FOR EACH STATEMENT EXECUTE FUNCTION public.saas_quantity_unit_guard();


--
-- PostgreSQL database dump complete
--


